import pytest
import torch
from eval_helpers import make_blobs

from moco_lightning.eval.checkpoint import (
    CheckpointError,
    UnsafeCheckpointError,
    load_backbone,
    read_backbone_checkpoint,
)


def test_loads_the_query_backbone_with_its_architecture_from_hyper_parameters(moco_checkpoint):
    model, path = moco_checkpoint
    backbone, dim, ckpt = load_backbone(path)
    assert dim == model.feature_dim == 512
    assert ckpt.backbone == "resnet18" and ckpt.cifar_stem and ckpt.source == "moco_lightning"
    assert not backbone.training
    x = make_blobs(4, seed=5)[0]
    torch.testing.assert_close(backbone(x), model.embed(x))


def test_only_query_backbone_keys_are_kept(moco_checkpoint):
    _, path = moco_checkpoint
    ckpt = read_backbone_checkpoint(path)
    assert "conv1.weight" in ckpt.state_dict and "layer4.1.bn2.running_var" in ckpt.state_dict
    assert not any(k.startswith(("fc", "head", "encoder", "queue", "key_queue")) for k in ckpt.state_dict)


def test_a_file_that_is_not_a_moco_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "classifier.ckpt"
    torch.save({"state_dict": {"model.conv1.weight": torch.zeros(1)}, "hyper_parameters": {}}, path)
    with pytest.raises(CheckpointError, match=r"classifier\.ckpt is not a MoCo checkpoint.*encoder_q"):
        load_backbone(path)
    bare = tmp_path / "weights.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, bare)
    with pytest.raises(CheckpointError, match=r"weights\.pth is not a MoCo checkpoint: it has no 'state_dict'"):
        load_backbone(bare)


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        load_backbone(tmp_path / "nope.ckpt")


def test_a_backbone_that_does_not_match_is_a_clear_error(moco_checkpoint):
    _, path = moco_checkpoint
    with pytest.raises(CheckpointError, match=r"backbone does not match.*width 512.*resnet50.*width 2048"):
        load_backbone(path, backbone="resnet50")


def test_a_checkpoint_of_a_custom_backbone_needs_the_module(tmp_path):
    path = tmp_path / "custom.ckpt"
    torch.save({"state_dict": {"encoder_q.backbone.0.weight": torch.zeros(6, 3, 3, 3)}, "hyper_parameters": {}}, path)
    with pytest.raises(CheckpointError, match="custom backbone module.*pass backbone="):
        load_backbone(path)
    module = torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 3, bias=False), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()
    )
    backbone, dim, _ = load_backbone(path, backbone=module)
    assert dim == 6 and torch.equal(backbone[0].weight, torch.zeros(6, 3, 3, 3))


def test_official_moco_checkpoint_format_is_accepted(moco_checkpoint, tmp_path):
    model, _ = moco_checkpoint
    state = {f"module.encoder_q.{k}": v for k, v in model.encoder_q.backbone.state_dict().items()}
    state["module.encoder_q.fc.weight"] = torch.zeros(128, 512)  # the official head lives in fc
    state["module.encoder_k.conv1.weight"] = torch.zeros(1)
    path = tmp_path / "checkpoint_0199.pth.tar"
    torch.save({"epoch": 200, "arch": "resnet18", "state_dict": state}, path)
    backbone, dim, ckpt = load_backbone(path)
    assert ckpt.source == "official" and ckpt.cifar_stem and dim == 512
    x = make_blobs(2, seed=6)[0]
    torch.testing.assert_close(backbone(x), model.embed(x))


def test_query_encoder_is_backbone_head_and_normalisation(moco_checkpoint):
    from moco_lightning.eval import load_query_encoder

    model, path = moco_checkpoint
    encoder, dim, _ = load_query_encoder(path)
    x = make_blobs(3, seed=7)[0]
    assert dim == 16 and not encoder.training
    torch.testing.assert_close(encoder(x), model.project(x))


@pytest.mark.parametrize("mlp", [False, True])
def test_query_encoder_of_an_official_checkpoint_reads_the_head_shape(moco_checkpoint, tmp_path, mlp):
    from moco_lightning.eval import load_query_encoder

    model, _ = moco_checkpoint
    state = {f"module.encoder_q.{k}": v for k, v in model.encoder_q.backbone.state_dict().items()}
    head = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.ReLU(), torch.nn.Linear(512, 128)) if mlp \
        else torch.nn.Linear(512, 128)
    state.update({f"module.encoder_q.fc.{k}": v for k, v in head.state_dict().items()})
    path = tmp_path / "official.pth.tar"
    torch.save({"arch": "resnet18", "state_dict": state}, path)
    encoder, dim, _ = load_query_encoder(path)
    x = make_blobs(2, seed=8)[0]
    expected = torch.nn.functional.normalize(head(model.embed(x)), dim=1)
    assert dim == 128
    torch.testing.assert_close(encoder(x), expected)


def test_query_encoder_without_a_head_is_a_clear_error(moco_checkpoint, tmp_path):
    from moco_lightning.eval import load_query_encoder

    model, _ = moco_checkpoint
    state = {f"module.encoder_q.{k}": v for k, v in model.encoder_q.backbone.state_dict().items()}
    path = tmp_path / "no_head.pth.tar"
    torch.save({"arch": "resnet18", "state_dict": state}, path)
    with pytest.raises(CheckpointError, match="features=backbone"):
        load_query_encoder(path)


class _RunsCode:
    """Unpickling this creates a folder: a stand-in for whatever code a hostile checkpoint would run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return os.makedirs, (self.marker,)


def pickled_code_checkpoint(moco_checkpoint, tmp_path):
    """The tiny MoCo checkpoint plus an entry whose unpickling runs code; returns (path, marker folder)."""
    _, path = moco_checkpoint
    checkpoint = torch.load(path, weights_only=True)
    marker = tmp_path / "code_ran"
    checkpoint["extra"] = _RunsCode(marker)
    hostile = tmp_path / "hostile.ckpt"
    torch.save(checkpoint, hostile)
    return hostile, marker


def test_a_checkpoint_that_would_run_code_is_refused_unless_allowed(moco_checkpoint, tmp_path):
    hostile, marker = pickled_code_checkpoint(moco_checkpoint, tmp_path)
    with pytest.raises(UnsafeCheckpointError) as info:
        load_backbone(hostile)
    message = str(info.value)
    assert "\n" not in message and str(hostile) in message and "os.makedirs" in message
    assert "allow_pickle=true" in message and "--trust-checkpoint" in message
    assert not marker.exists()  # nothing ran
    ckpt = read_backbone_checkpoint(hostile, allow_pickle=True)  # the explicit opt-in loads it, code and all
    assert marker.is_dir() and "conv1.weight" in ckpt.state_dict


def test_the_argparse_options_of_a_training_script_load_without_opt_in(moco_checkpoint, tmp_path):
    import argparse

    _, path = moco_checkpoint
    with_args = tmp_path / "with_args.ckpt"
    torch.save({**torch.load(path, weights_only=True), "args": argparse.Namespace(lr=0.03, arch="resnet18")},
               with_args)
    assert read_backbone_checkpoint(with_args).backbone == "resnet18"
