import math

import pytest
import torch

from moco_lightning.optim import build_optimizer, lr_lambda, scaled_lr


def test_step_schedule_decays_at_milestone_epochs():
    f = lr_lambda("step", total_steps=200, steps_per_epoch=1, milestones=(120, 160))
    assert f(0) == 1.0 and f(119) == 1.0
    assert f(120) == pytest.approx(0.1) and f(159) == pytest.approx(0.1)
    assert f(160) == pytest.approx(0.01)


def test_cosine_schedule_by_step():
    f = lr_lambda("cosine", total_steps=100, steps_per_epoch=10)
    assert f(0) == 1.0
    assert f(50) == pytest.approx(0.5)
    assert f(100) == pytest.approx(0.0, abs=1e-12)
    assert f(25) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))


def test_linear_warmup_then_schedule():
    f = lr_lambda("cosine", total_steps=110, steps_per_epoch=10, warmup_epochs=1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(60) == pytest.approx(0.5)


def test_scaled_lr_linear_rule():
    assert scaled_lr(0.03, 256) == pytest.approx(0.03)
    assert scaled_lr(0.03, 1024) == pytest.approx(0.12)


def test_unknown_names_are_errors():
    with pytest.raises(ValueError, match="lr_schedule"):
        lr_lambda("poly", 10, 1)
    with pytest.raises(ValueError, match="optimizer"):
        build_optimizer([torch.nn.Parameter(torch.zeros(1))], name="adamw")
