"""The evaluation entry points: moco-eval-knn, moco-eval-linear (Hydra) and moco-export (argparse)."""

import json
import pickle
import re
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf.errors import ConfigAttributeError, MissingMandatoryValue

from moco_lightning import MoCo
from moco_lightning.cli import CONFIG_PATH, eval_knn
from moco_lightning.cli.eval_linear import evaluate_linear
from moco_lightning.cli.export import main as export_main
from moco_lightning.cli.export import output_name
from moco_lightning.cli.pretraining_data import adopt_pretraining_data
from moco_lightning.eval.checkpoint import UnsafeCheckpointError

REPO = Path(__file__).resolve().parents[2]
TINY_DATA = ["data.image_size=8", "data.eval_batch_size=128"]


def _checkpoint(path: Path, cifar_stem: bool = True) -> Path:
    torch.manual_seed(0)
    model = MoCo(backbone="resnet18", cifar_stem=cifar_stem, dim=16, queue_size=32)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(model)
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return _checkpoint(tmp_path_factory.mktemp("ckpt") / "moco.ckpt")


def _compose(name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=CONFIG_PATH, version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


@pytest.mark.parametrize("name", ["eval_knn", "eval_linear"])
def test_eval_configs_need_a_checkpoint_and_reject_typos(name):
    cfg = _compose(name, [])
    with pytest.raises(MissingMandatoryValue):
        _ = cfg.checkpoint
    with pytest.raises(Exception, match="temprature|not in struct"):
        _compose(name, ["temprature=0.1"])
    with pytest.raises(ConfigAttributeError):
        _ = cfg.no_such_key


def test_eval_linear_config_defaults_are_the_official_protocol():
    cfg = _compose("eval_linear", ["checkpoint=x.ckpt"])
    assert (cfg.lr, cfg.momentum, cfg.weight_decay, cfg.schedule, list(cfg.milestones)) == (
        30.0,
        0.9,
        0.0,
        "step",
        [60, 80],
    )
    assert cfg.trainer.max_epochs == 100 and cfg.batch_size == 256


def test_eval_linear_keeps_the_global_batch_of_the_protocol_on_any_device_count():
    from moco_lightning.cli.config_checks import ConfigError
    from moco_lightning.cli.eval_linear import per_device_batch

    one = _compose("eval_linear", ["checkpoint=x.ckpt", "trainer.accelerator=cpu"])
    four = _compose("eval_linear", ["checkpoint=x.ckpt", "trainer.accelerator=cpu", "trainer.devices=4"])
    nodes = _compose("eval_linear", ["checkpoint=x.ckpt", "trainer.accelerator=cpu", "trainer.devices=4",
                                     "trainer.num_nodes=2"])
    assert (per_device_batch(one), per_device_batch(four), per_device_batch(nodes)) == (256, 64, 32)
    three = _compose("eval_linear", ["checkpoint=x.ckpt", "trainer.accelerator=cpu", "trainer.devices=3"])
    with pytest.raises(ConfigError, match="batch_size=256 .* not divisible by the 3 processes"):
        per_device_batch(three)


def test_eval_knn_with_a_label_fraction_uses_the_labelled_subset_as_its_bank(checkpoint, tmp_path):
    from moco_lightning.data import DigitsDataModule
    from moco_lightning.data.labels import read_subset_file
    from moco_lightning.eval.checkpoint import load_backbone, read_backbone_checkpoint
    from moco_lightning.eval.knn import knn_accuracy

    cfg = _compose("eval_knn", [f"checkpoint={checkpoint}", "device=cpu", "label_fraction=0.1", "label_seed=3",
                                f"paths.output_dir={tmp_path}", *TINY_DATA])
    result = eval_knn.evaluate_knn(cfg)
    assert (result["label_fraction"], result["label_seed"], result["train_images"]) == (0.1, 3, 1437)
    chosen = read_subset_file(tmp_path / "labelled_indices.txt")
    assert result["labelled_images"] == len(chosen) == 142  # round(0.1 x each class), as written to the run folder
    # the same kNN with the bank restricted by hand
    backbone, _, _ = load_backbone(read_backbone_checkpoint(str(checkpoint)))
    datamodule = DigitsDataModule(image_size=8, eval_batch_size=128, num_workers=0)
    datamodule.setup("fit")
    datamodule.use_labelled_subset(chosen)
    expected = knn_accuracy(backbone.eval(), datamodule.eval_train_dataloader(), datamodule.eval_val_dataloader())
    assert result["knn_top1"] == expected["top1"]
    full = eval_knn.evaluate_knn(_compose("eval_knn", [f"checkpoint={checkpoint}", "device=cpu", *TINY_DATA]))
    assert full["labelled_images"] == full["train_images"] == 1437


def test_a_label_fraction_out_of_range_is_one_line(checkpoint):
    from moco_lightning.data import DatasetError

    with pytest.raises(DatasetError, match=r"^label_fraction=0.0 must be in \(0, 1\]"):
        eval_knn.evaluate_knn(_compose("eval_knn", [f"checkpoint={checkpoint}", "label_fraction=0", *TINY_DATA]))


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_eval_knn_script_prints_saves_accuracy_and_writes_beside_the_checkpoint(checkpoint, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    last = run / "checkpoints" / "last.ckpt"
    last.write_bytes(checkpoint.read_bytes())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = subprocess.run([sys.executable, str(REPO / "eval_knn.py"), f"checkpoint={last}", *TINY_DATA],
                          capture_output=True, text=True, timeout=220, cwd=elsewhere)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "kNN (k=200, t=0.1) on DigitsDataModule: top-1" in proc.stdout
    [folder] = (run / "eval").iterdir()  # the run folder beside the checkpoint's run
    assert folder.name.startswith("knn_")
    assert not any(elsewhere.iterdir())  # no outputs/<date>/<time> where the command ran
    result = json.loads((folder / "results.json").read_text())
    assert result["backbone"] == "resnet18" and result["checkpoint"] == str(last)
    assert 0.3 < result["knn_top1"] <= result["knn_top5"] <= 1.0  # chance is 0.1


@pytest.mark.parametrize(("name", "overrides", "kind"), [
    ("eval_knn", [], "knn"),
    ("eval_linear", [], "linear_moco"),
    ("eval_linear", ["linear_protocol=features"], "linear_features"),
    ("eval_finetune", [], "finetune"),
])
def test_eval_run_folders_are_beside_the_checkpoint_they_evaluate(name, overrides, kind, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    for checkpoint, parent in ((run / "checkpoints" / "last.ckpt", run / "eval"),  # a moco-train run
                               (tmp_path / "moco_v2_200ep.pth.tar", tmp_path / "eval")):  # a file on its own
        cfg = _compose_with_hydra(name, [f"checkpoint={checkpoint}", *overrides])
        folder = Path(cfg.hydra.run.dir)
        assert folder.parent == parent and re.fullmatch(rf"{kind}_\d{{4}}-\d\d-\d\d_\d\d-\d\d-\d\d", folder.name)


@pytest.mark.parametrize(("name", "overrides"), [
    ("eval_linear", ["linear_protocol=features", "checkpoint=pixels"]),
    ("eval_finetune", ["checkpoint=none"]),
    ("eval_knn", []),  # not given: the run says so; no folder beside a file that is not there
])
def test_eval_runs_without_a_checkpoint_file_keep_hydras_outputs_folder(name, overrides):
    folder = Path(_compose_with_hydra(name, overrides).hydra.run.dir)
    assert folder.parts[0] == "outputs" and re.fullmatch(r"\d\d-\d\d-\d\d", folder.name)


def _compose_with_hydra(name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=CONFIG_PATH, version_base="1.3"):
        return compose(config_name=name, overrides=overrides, return_hydra_config=True)


def test_eval_knn_on_the_embedding_evaluates_the_whole_query_encoder(checkpoint, monkeypatch):
    seen = {}

    def fake_knn(embed, train_loader, val_loader, **kwargs):  # the data path is tested above; check what embeds
        seen["out"] = embed(next(iter(val_loader))[0][:2])
        return {"top1": 0.5, "top5": 0.9}

    monkeypatch.setattr(eval_knn, "knn_accuracy", fake_knn)
    cfg = _compose("eval_knn", [f"checkpoint={checkpoint}", "features=embedding", "device=cpu", *TINY_DATA])
    result = eval_knn.evaluate_knn(cfg)
    assert result["features"] == "embedding" and result["feature_dim"] == 16  # the 16-d embedding, not 512
    assert seen["out"].shape == (2, 16)
    torch.testing.assert_close(seen["out"].norm(dim=1), torch.ones(2))


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_eval_knn_of_a_non_moco_file_exits_with_a_message(tmp_path):
    bad = tmp_path / "weights.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, bad)
    proc = subprocess.run(
        [sys.executable, str(REPO / "eval_knn.py"), f"checkpoint={bad}", f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True,
        text=True,
        timeout=220,
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert "is not a MoCo checkpoint" in proc.stderr


@pytest.mark.timeout(180)
def test_eval_linear_runs_the_protocol_from_the_config(checkpoint, tmp_path):
    cfg = _compose(
        "eval_linear",
        [
            f"checkpoint={checkpoint}",
            *TINY_DATA,
            f"paths.output_dir={tmp_path}",
            "trainer.max_epochs=1",
            "trainer.limit_train_batches=3",
            "+trainer.limit_val_batches=1",
            "milestones=[1]",
            "trainer.accelerator=cpu",
            "trainer.enable_progress_bar=false",
            "trainer.enable_model_summary=false",
        ],
    )
    result, trainer = evaluate_linear(cfg)
    assert trainer.current_epoch == 1  # the sanity check after the first epoch passed
    assert result["epochs"] == 1 and 0.0 <= result["linear_top1"] <= result["linear_top5"] <= 1.0
    assert result["linear_best_top1"] == result["linear_top1"] and result["best_epoch"] == 1  # epochs count from 1
    assert result["global_batch"] == 256 and cfg.data.eval_batch_size == 256  # one process: all of it
    assert (tmp_path / "csv" / "metrics.csv").is_file()  # the configured logger wrote the curves


def test_a_data_config_unlike_pretraining_is_warned_about(tmp_path, caplog):
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text(
        "data:\n  _target_: moco_lightning.data.DigitsDataModule\n  image_size: 8\n"
    )
    cfg = _compose("eval_knn", [f"checkpoint={run / 'checkpoints' / 'last.ckpt'}"])  # image_size 16 by default
    with caplog.at_level("WARNING"):
        adopt_pretraining_data(cfg)  # composed in Python: the data as configured, with a warning
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "data.image_size=16" in warnings[0] and "data.image_size=8" in warnings[0]
    caplog.clear()
    cfg = _compose("eval_knn", [f"checkpoint={run / 'checkpoints' / 'last.ckpt'}", "data.image_size=8"])
    with caplog.at_level("WARNING"):
        adopt_pretraining_data(cfg)
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_export_writes_both_formats_next_to_the_checkpoint(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path / "imagenet_stem.ckpt", cifar_stem=False)
    export_main([str(ckpt)])
    tv, d2 = tmp_path / "imagenet_stem_torchvision.pth", tmp_path / "imagenet_stem_detectron2.pkl"
    assert tv.is_file() and d2.is_file()
    assert "conv1.weight" in torch.load(tv, weights_only=True)
    with d2.open("rb") as f:
        assert "res5.1.conv2.norm.running_mean" in pickle.load(f)["model"]


def test_export_of_a_pth_tar_checkpoint_names_its_output_without_the_double_suffix(checkpoint, tmp_path):
    official_style = tmp_path / "moco_v2_200ep.pth.tar"
    official_style.write_bytes(checkpoint.read_bytes())
    export_main([str(official_style), "--format", "torchvision"])
    assert [p.name for p in tmp_path.glob("*.pth")] == ["moco_v2_200ep_torchvision.pth"]


@pytest.mark.parametrize(("name", "expected"), [
    ("x.pth.tar", "x_torchvision.pth"), ("last.ckpt", "last_torchvision.pth"), ("r50.pth", "r50_torchvision.pth"),
    ("r50.pt", "r50_torchvision.pth"), ("epoch3-knn0.9.ckpt", "epoch3-knn0.9_torchvision.pth"),
    ("weights.bin", "weights_torchvision.pth"), ("plain", "plain_torchvision.pth")])
def test_export_default_name_drops_the_checkpoint_ending_whole(name, expected):
    assert output_name(Path("runs") / name, "torchvision") == expected


def test_export_one_format_to_a_chosen_file(checkpoint, tmp_path, capsys):
    export_main([str(checkpoint), "--format", "torchvision", "--output", str(tmp_path / "r18.pth")])
    assert (tmp_path / "r18.pth").is_file()
    assert "cifar_stem=True" in capsys.readouterr().out  # tells how to load a CIFAR-stem backbone


def test_export_of_a_non_moco_file_exits_with_a_message(tmp_path, capsys):
    bad = tmp_path / "weights.pth"
    torch.save({"state_dict": {"fc.weight": torch.zeros(1)}}, bad)
    with pytest.raises(SystemExit) as exit_info:
        export_main([str(bad), "--format", "torchvision"])
    assert exit_info.value.code == 2
    assert "not a MoCo checkpoint" in capsys.readouterr().err


def test_export_refuses_a_checkpoint_that_would_run_code_unless_trusted(checkpoint, tmp_path, capsys):
    marker = tmp_path / "code_ran"
    hostile = tmp_path / "hostile.ckpt"
    torch.save({**torch.load(checkpoint, weights_only=True), "extra": _RunsCode(marker)}, hostile)
    out = tmp_path / "r18.pth"
    with pytest.raises(SystemExit) as exit_info:
        export_main([str(hostile), "--format", "torchvision", "--output", str(out)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--trust-checkpoint" in err and err.count("\n") == 1
    assert not marker.exists() and not out.exists()
    export_main([str(hostile), "--format", "torchvision", "--output", str(out), "--trust-checkpoint"])
    assert marker.is_dir() and out.is_file()


def test_eval_entry_points_refuse_pickled_code_unless_allow_pickle(checkpoint, tmp_path):
    marker = tmp_path / "code_ran"
    hostile = tmp_path / "hostile.ckpt"
    torch.save({**torch.load(checkpoint, weights_only=True), "extra": _RunsCode(marker)}, hostile)
    for name, evaluate in (("eval_linear", evaluate_linear), ("eval_knn", eval_knn.evaluate_knn)):
        with pytest.raises(UnsafeCheckpointError, match="allow_pickle=true"):
            evaluate(_compose(name, [f"checkpoint={hostile}", *TINY_DATA]))
    assert not marker.exists()
    result = eval_knn.evaluate_knn(_compose("eval_knn", [f"checkpoint={hostile}", "allow_pickle=true", *TINY_DATA]))
    assert marker.is_dir() and result["checkpoint"] == str(hostile) and 0.0 <= result["knn_top1"] <= 1.0


class _RunsCode:
    """Unpickling this creates a folder: a stand-in for whatever code a hostile checkpoint would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return os.makedirs, (self.marker,)


@pytest.mark.timeout(120)
def test_eval_knn_without_a_checkpoint_is_one_line_naming_the_key(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "eval_knn.py")], capture_output=True, text=True, timeout=100,
                          cwd=tmp_path)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower() or "Traceback" in line]
    assert errors == ["error: checkpoint is not set; set checkpoint=..."]
