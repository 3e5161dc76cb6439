"""speed=gpu: bf16 mixed precision, channels-last, cudnn.benchmark and compile in one word; the default: none."""

from __future__ import annotations

import pytest
import torch
import yaml

from .conftest import run_train

RECIPES = ["imagenet_mocov2", "imagenet_mocov3_resnet50", "cifar10_mocov2"]


def fast(cfg) -> tuple:
    return cfg.trainer.precision, cfg.trainer.benchmark, cfg.model.channels_last, cfg.model.compile


@pytest.mark.parametrize("experiment", RECIPES)
def test_speed_gpu_turns_on_the_four_switches_for_the_recipes(compose_train, experiment):
    assert fast(compose_train([f"experiment={experiment}", "speed=gpu"])) == ("bf16-mixed", True, True, True)


@pytest.mark.parametrize("experiment", RECIPES)
def test_the_official_recipes_are_unchanged_by_default(compose_train, experiment):
    official = compose_train([f"experiment={experiment}"])
    assert official == compose_train([f"experiment={experiment}", "speed=default"])
    precision = "16-mixed" if experiment == "imagenet_mocov3_resnet50" else 32  # v3: the official torch.cuda.amp
    assert fast(official) == (precision, None, False, False)


def test_the_command_line_wins_over_the_preset(compose_train):
    cfg = compose_train(["experiment=imagenet_mocov2", "speed=gpu", "trainer.precision=16-mixed",
                         "model.compile=false"])
    assert fast(cfg) == ("16-mixed", True, True, False)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_speed_gpu_trains_a_step_on_the_cpu(tmp_path):
    # bf16 autocast is emulated on this CPU. The compile backend is dynamo's "eager": the graph capture of the
    # backbones as with inductor, without its C++ code generation (minutes on a cold CPU cache) or AOT autograd
    # (tests/test_speed_options.py runs aot_eager on a small network); benchmarks/gpu_check.sh compiles with
    # inductor on a GPU.
    args = ["speed=gpu", "model.compile={backend:eager}", "trainer.accelerator=cpu", "data.image_size=8",
            "data.batch_size=4", "model.queue_size=8", "trainer.max_epochs=1", "trainer.limit_train_batches=1",
            "knn_report=false", "~callbacks.knn", "callbacks.embedding_map=null",
            "callbacks.progress_bar.refresh_rate=0", "trainer.enable_model_summary=false", f"hydra.run.dir={tmp_path}"]
    result = run_train(args, cwd=tmp_path, timeout=230)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "Using bfloat16 Automatic Mixed Precision" in output
    assert "torch threads as you set them (OMP_NUM_THREADS=1)" in output  # the run's CPU line keeps the user's
    saved = yaml.safe_load((tmp_path / ".hydra" / "config.yaml").read_text())
    assert (saved["trainer"]["precision"], saved["trainer"]["benchmark"]) == ("bf16-mixed", True)
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 1
    assert checkpoint["hyper_parameters"]["channels_last"] is True
    assert checkpoint["hyper_parameters"]["compile"] == {"backend": "eager"}
    assert not any("_orig_mod" in key for key in checkpoint["state_dict"])  # compiled in place: same names
