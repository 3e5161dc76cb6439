import copy

import pytest
import torch
from torch import nn

from moco_lightning.ema import HALF_PRECISION_WEIGHTS, check_weight_precision, cosine_momentum, momentum_update


def make_pair():
    online = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    online(torch.randn(2, 3, 6, 6))
    target = copy.deepcopy(online)
    for p in online.parameters():
        p.data.add_(torch.randn_like(p))
    # make the online BN statistics differ from the target's
    online[1].running_mean.add_(1.0)
    online[1].num_batches_tracked.add_(5)
    return online, target


def test_zero_momentum_copies_parameters():
    online, target = make_pair()
    momentum_update(online, target, 0.0)
    for po, pt in zip(online.parameters(), target.parameters()):
        assert torch.equal(po, pt)


def test_unit_momentum_freezes_target():
    online, target = make_pair()
    before = copy.deepcopy(target.state_dict())
    momentum_update(online, target, 1.0)
    for key, value in target.state_dict().items():
        assert torch.equal(value, before[key])


def test_momentum_matches_formula_on_every_parameter():
    online, target = make_pair()
    pairs = zip(online.parameters(), target.parameters())
    expected = [0.9 * pt.detach().clone() + 0.1 * po.detach() for po, pt in pairs]
    momentum_update(online, target, 0.9)
    for want, got in zip(expected, target.parameters()):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_bn_buffers_are_not_averaged():
    online, target = make_pair()
    buffers_before = {k: v.clone() for k, v in target.named_buffers()}
    momentum_update(online, target, 0.5)
    for name, value in target.named_buffers():
        assert torch.equal(value, buffers_before[name]), name


def test_momentum_out_of_range_is_an_error():
    online, target = make_pair()
    with pytest.raises(ValueError, match="momentum must be in"):
        momentum_update(online, target, 1.5)


def test_cosine_momentum_rises_from_base_to_one():
    assert cosine_momentum(0, 100, 0.99) == pytest.approx(0.99)
    assert cosine_momentum(50, 100, 0.99) == pytest.approx(0.995)
    assert cosine_momentum(100, 100, 0.99) == pytest.approx(1.0)
    values = [cosine_momentum(s, 100, 0.99) for s in range(101)]
    assert all(a <= b for a, b in zip(values, values[1:]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weights_lose_the_momentum_step_to_rounding(dtype):
    # why check_weight_precision refuses them: a step of 0.001 of the way is at the 16-bit spacing of the weight
    torch.manual_seed(0)
    online, target = nn.Linear(64, 64), nn.Linear(64, 64)
    exact = 0.001 * (online.weight - target.weight).detach().double()
    online, target = online.to(dtype), target.to(dtype)
    before = target.weight.detach().double()
    momentum_update(online, target, 0.999)
    error = ((target.weight.detach().double() - before) - exact).abs().sum() / exact.abs().sum()
    assert error > 0.1, error  # float32 weights: about 1e-5 (the rounding of the weights themselves)


@pytest.mark.parametrize("precision", HALF_PRECISION_WEIGHTS)
def test_half_precision_weights_are_refused(precision):
    with pytest.raises(ValueError, match=f"precision={precision} keeps the weights in 16 bits"):
        check_weight_precision(precision)


@pytest.mark.parametrize("precision", ["32-true", 32, "bf16-mixed", "16-mixed", "64-true", None])
def test_float32_weights_are_accepted(precision):
    check_weight_precision(precision)
