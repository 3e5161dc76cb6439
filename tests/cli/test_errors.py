"""cli/errors.py: the library's argument names become the config keys of the node that built the object."""

from moco_lightning.cli.errors import (
    arguments_of,
    error_line,
    in_keys,
    instantiation_message,
    name_settings,
    node_settings,
    refused_arguments,
    signature_of,
)


def test_arguments_named_in_a_message_get_the_nodes_path():
    message = "every_n_epochs=0 must be >= 1; set every_n_epochs, or lr= lower (the labels stay)"
    assert name_settings(message, "callbacks.knn", ["every_n_epochs", "lr", "labels"]) == (
        "callbacks.knn.every_n_epochs=0 must be >= 1; set callbacks.knn.every_n_epochs, or callbacks.knn.lr= lower "
        "(the labels stay)")


def test_a_name_already_under_a_path_is_left_alone():
    assert name_settings("data.data_dir=x is empty", "data", ["data_dir"]) == "data.data_dir=x is empty"
    assert in_keys("queue_size=8 and batch_size=4", {"queue_size": "model.queue_size"}) == \
        "model.queue_size=8 and batch_size=4"


def test_a_node_is_read_through_its_target():
    node = {"_target_": "moco_lightning.eval.knn.KNNMonitor"}
    assert "every_n_epochs" in arguments_of(__import__("moco_lightning.eval.knn", fromlist=["KNNMonitor"]).KNNMonitor)
    assert node_settings("set every_n_epochs", node, "callbacks.knn") == "set callbacks.knn.every_n_epochs"
    assert node_settings("set every_n_epochs", {"_target_": "no.such.Class"}, "x") == "set every_n_epochs"


def test_a_python_value_after_a_named_argument_is_written_as_in_the_config():
    message = "set download=True, or data_dir=None; True stays"
    assert name_settings(message, "data", ["download", "data_dir"]) == \
        "set data.download=true, or data.data_dir=null; True stays"


def test_the_arguments_of_a_class_include_those_its_kwargs_pass_up_this_package():
    from moco_lightning.data import DigitsDataModule, ImageFolderDataModule

    arguments, closed = signature_of(ImageFolderDataModule)
    assert {"data_dir", "val_fraction", "batch_size", "image_size"} <= set(arguments) and closed
    assert arguments["val_fraction"] is float
    assert "batch_size" in arguments_of(DigitsDataModule)
    assert signature_of(lambda x, **kwargs: x) == ({"x": __import__("typing").Any}, False)


def test_a_constructor_error_wrapped_by_hydra_names_the_nodes_keys():
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"data": {"_target_": "moco_lightning.data.ImageFolderDataModule", "data_dir": "x",
                                     "val_fraction": 1.5}})
    try:
        instantiate(cfg.data)
    except InstantiationException as err:
        assert refused_arguments(err)
        assert instantiation_message(err, cfg) == "ImageFolderDataModule: data.val_fraction=1.5 must be in [0, 1)"
        assert error_line(err, cfg) == instantiation_message(err, cfg)
    else:
        raise AssertionError("val_fraction=1.5 was accepted")
    assert not refused_arguments(InstantiationException("no cause"))


def test_a_dataset_error_names_the_data_nodes_keys_and_others_stay_as_they_are():
    from omegaconf import OmegaConf

    from moco_lightning.data import DatasetError

    cfg = OmegaConf.create({"data": {"_target_": "moco_lightning.data.ImageFolderDataModule", "data_dir": "x"}})
    assert error_line(DatasetError("data_dir='x' is an empty folder"), cfg) == "data.data_dir='x' is an empty folder"
    assert error_line(FileNotFoundError("data_dir x"), cfg) == "data_dir x"
