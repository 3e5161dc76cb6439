import math

import pytest
import torch

from moco_lightning.optim import LARS, build_optimizer, lr_lambda, scaled_lr


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
        build_optimizer([torch.nn.Parameter(torch.zeros(1))], name="rmsprop")


def _reference_lars(w, grads, lr, wd, momentum, eta, lars_on):
    """LARS from its formula in float64 (official moco-v3 optimizer.py): the weights after each gradient."""
    w, mu, out = w.clone(), torch.zeros_like(w), []
    for g in grads:
        d = g.clone()
        if lars_on:
            d = d + wd * w
            w_norm, d_norm = math.sqrt(float((w * w).sum())), math.sqrt(float((d * d).sum()))
            d = d * (eta * w_norm / d_norm if w_norm > 0 and d_norm > 0 else 1.0)
        mu = momentum * mu + d
        w = w - lr * mu
        out.append(w.clone())
    return out


def _run_lars(params, grads_per_step, **kwargs):
    opt = LARS(params, **kwargs)
    history = []
    for grads in grads_per_step:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        history.append([p.detach().clone() for p in params])
    return history


@pytest.mark.parametrize("exclude_1d", [True, False])
def test_lars_update_matches_the_formula_with_and_without_the_1d_exclusion(exclude_1d):
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(3, 4, generator=g, dtype=torch.float64)
    bias = torch.randn(3, generator=g, dtype=torch.float64)
    grads = [(torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64))
             for _ in range(3)]
    hp = dict(lr=0.5, weight_decay=0.01, momentum=0.9, trust_coefficient=0.001)
    params = [torch.nn.Parameter(weight.clone()), torch.nn.Parameter(bias.clone())]
    history = _run_lars(params, grads, exclude_1d=exclude_1d, **hp)
    args = dict(lr=0.5, wd=0.01, momentum=0.9, eta=0.001)
    want_w = _reference_lars(weight, [gw for gw, _ in grads], lars_on=True, **args)
    want_b = _reference_lars(bias, [gb for _, gb in grads], lars_on=not exclude_1d, **args)
    for step, (w, b) in enumerate(history):
        torch.testing.assert_close(w, want_w[step], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(b, want_b[step], rtol=1e-12, atol=1e-12)


def test_lars_trust_ratio_is_one_for_a_zero_weight():
    w = torch.nn.Parameter(torch.zeros(2, 2, dtype=torch.float64))
    history = _run_lars([w], [[torch.ones(2, 2, dtype=torch.float64)]], lr=0.1, weight_decay=0.0, momentum=0.9)
    torch.testing.assert_close(history[0][0], torch.full((2, 2), -0.1, dtype=torch.float64))


def test_build_optimizer_offers_the_v3_optimizers_with_their_settings():
    params = [torch.nn.Parameter(torch.zeros(2, 2))]
    lars = build_optimizer(params, "lars", lr=0.1, momentum=0.9, weight_decay=1e-6, trust_coefficient=0.002)
    assert isinstance(lars, LARS) and lars.defaults["trust_coefficient"] == 0.002 and lars.defaults["exclude_1d"]
    adamw = build_optimizer(params, "adamw", lr=1.5e-4, weight_decay=0.1, betas=[0.9, 0.95])
    assert isinstance(adamw, torch.optim.AdamW)
    assert adamw.defaults["betas"] == (0.9, 0.95) and adamw.defaults["weight_decay"] == 0.1


def test_resumed_scheduler_keeps_this_runs_base_lr_and_the_checkpoints_step(caplog):
    from moco_lightning.optim import ResumableLambdaLR

    factor = lr_lambda("cosine", total_steps=10, steps_per_epoch=5)
    param = torch.nn.Parameter(torch.zeros(1))
    old_opt = build_optimizer([param], lr=0.01)
    old = ResumableLambdaLR(old_opt, factor)
    for _ in range(3):
        old_opt.step()
        old.step()
    new_opt = build_optimizer([param], lr=0.02)  # the lr scaled to a global batch twice as large
    new = ResumableLambdaLR(new_opt, factor)
    new_opt.load_state_dict(old_opt.state_dict())  # what Lightning restores: lr and initial_lr of the old run
    with caplog.at_level("INFO", logger="moco_lightning.optim"):
        new.load_state_dict(old.state_dict())
    assert new.last_epoch == 3 and new.base_lrs == [0.02]
    assert new_opt.param_groups[0]["lr"] == pytest.approx(0.02 * factor(3))
    assert new_opt.param_groups[0]["initial_lr"] == 0.02 and new.get_last_lr() == [new_opt.param_groups[0]["lr"]]
    assert "base lr 0.01 in the checkpoint, 0.02 now" in caplog.text
    new_opt.step()
    new.step()
    assert new_opt.param_groups[0]["lr"] == pytest.approx(0.02 * factor(4))  # the schedule goes on from there


def sgd_after_two_steps(weight: torch.Tensor, grad: torch.Tensor) -> tuple[torch.optim.Optimizer, torch.Tensor]:
    param = torch.nn.Parameter(weight.clone(memory_format=torch.preserve_format))
    optimizer = build_optimizer([param], "sgd", lr=0.1, momentum=0.9, weight_decay=1e-4)
    for _ in range(2):
        param.grad = grad.clone()
        optimizer.step()
    return optimizer, param.detach()


def test_sgd_is_fused_for_contiguous_parameters_and_equals_the_loop():
    g = torch.Generator().manual_seed(0)
    weight, grad = torch.randn(4, 3, 3, 3, generator=g), torch.randn(4, 3, 3, 3, generator=g)
    optimizer, fused = sgd_after_two_steps(weight, grad)
    assert optimizer.defaults["fused"]
    loop = torch.nn.Parameter(weight.clone())
    reference = torch.optim.SGD([loop], lr=0.1, momentum=0.9, weight_decay=1e-4, foreach=False)
    for _ in range(2):
        loop.grad = grad.clone()
        reference.step()
    torch.testing.assert_close(fused, loop.detach(), atol=1e-6, rtol=1e-6)


def test_channels_last_parameters_with_a_gradient_in_the_other_layout_get_the_right_update():
    # torch's fused CPU SGD gets this case wrong (by the size of the weights); build_optimizer must not fuse it
    g = torch.Generator().manual_seed(0)
    weight, grad = torch.randn(4, 3, 3, 3, generator=g), torch.randn(4, 3, 3, 3, generator=g)
    _, expected = sgd_after_two_steps(weight, grad)
    optimizer, got = sgd_after_two_steps(weight.contiguous(memory_format=torch.channels_last), grad)
    assert not optimizer.defaults["fused"]
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
