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


def test_linear_warmup_then_schedule_as_official_v3():
    # official moco-v3: lr = base * epoch / warmup during warm-up (0 at the very first step), then the cosine
    f = lr_lambda("cosine", total_steps=110, steps_per_epoch=10, warmup_epochs=1)
    assert f(0) == 0.0 and f(5) == pytest.approx(0.5) and f(9) == pytest.approx(0.9)
    assert f(10) == pytest.approx(1.0) and f(60) == pytest.approx(0.5)


def test_epoch_interval_holds_the_lr_within_an_epoch_as_official_v1_v2():
    # official main_moco.py: lr = base * 0.5 * (1 + cos(pi * epoch / epochs)) at the start of each epoch
    f = lr_lambda("cosine", total_steps=40, steps_per_epoch=10, interval="epoch")
    for epoch in range(4):
        expected = 0.5 * (1 + math.cos(math.pi * epoch / 4))
        assert [f(epoch * 10 + i) for i in range(10)] == pytest.approx([expected] * 10)
    g = lr_lambda("step", total_steps=200, steps_per_epoch=1, milestones=(120, 160), interval="epoch")
    assert g(119) == 1.0 and g(120) == pytest.approx(0.1)


def test_milestones_and_warmup_follow_the_loader_when_max_steps_cuts_the_run():
    # 25 steps of a run with 10 steps per epoch: epoch 2 starts at step 20 whatever the total
    f = lr_lambda("step", total_steps=25, steps_per_epoch=10, milestones=(2,), interval="epoch")
    assert f(19) == 1.0 and f(20) == pytest.approx(0.1)
    w = lr_lambda("constant", total_steps=25, steps_per_epoch=10, warmup_epochs=1)
    assert w(5) == pytest.approx(0.5) and w(10) == 1.0


def test_scaled_lr_linear_rule():
    assert scaled_lr(0.03, 256) == pytest.approx(0.03)
    assert scaled_lr(0.03, 1024) == pytest.approx(0.12)


def test_unknown_names_are_errors():
    with pytest.raises(ValueError, match="lr_schedule"):
        lr_lambda("poly", 10, 1)
    with pytest.raises(ValueError, match="lr_interval"):
        lr_lambda("cosine", 10, 1, interval="batch")
    with pytest.raises(ValueError, match="optimizer"):
        build_optimizer([torch.nn.Parameter(torch.zeros(1))], name="adamw")
