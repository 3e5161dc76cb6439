import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from moco_lightning.diagnostics import alignment, key_ages, parameter_drift, similarity_stats, uniformity


def _pair() -> tuple[nn.Module, nn.Module]:
    online = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    target = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    return online, target


def test_drift_of_an_exact_copy_is_zero():
    online, target = _pair()
    target.load_state_dict(online.state_dict())
    assert parameter_drift(online, target).item() == 0.0


def test_drift_is_the_relative_distance_of_all_parameters_as_one_vector():
    online, target = _pair()
    flat_q = torch.cat([p.detach().double().flatten() for p in online.parameters()])
    flat_k = torch.cat([p.detach().double().flatten() for p in target.parameters()])
    expected = ((flat_k - flat_q).norm() / flat_q.norm()).item()
    assert parameter_drift(online, target).item() == pytest.approx(expected, rel=1e-5)


def test_drift_ignores_buffers_and_refuses_different_encoders():
    online, target = nn.BatchNorm1d(3), nn.BatchNorm1d(3)
    target.running_mean.fill_(5.0)  # a buffer, not a parameter
    assert parameter_drift(online, target).item() == 0.0
    with pytest.raises(ValueError, match="same parameters"):
        parameter_drift(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)))


def test_key_ages_are_steps_since_each_slot_was_written():
    written_at = torch.tensor([4, 4, 5, 5, 2, 2])
    oldest, mean = key_ages(written_at, step=5)
    assert oldest.item() == 3.0
    assert mean.item() == pytest.approx((1 + 1 + 0 + 0 + 3 + 3) / 6)


def test_similarity_stats_undo_the_temperature():
    t = 0.2
    sims = torch.tensor([[0.9, 0.1, -0.3, 0.5], [0.7, 0.2, 0.0, -0.1]])
    stats = similarity_stats(sims / t, t)
    assert stats["pos_sim"].item() == pytest.approx(0.8, abs=1e-6)
    assert stats["neg_sim"].item() == pytest.approx((0.1 - 0.3 + 0.5 + 0.2 + 0.0 - 0.1) / 6, abs=1e-6)
    assert stats["hardest_neg_sim"].item() == pytest.approx((0.5 + 0.2) / 2, abs=1e-6)
    assert stats["sim_gap"].item() == pytest.approx(stats["pos_sim"].item() - stats["neg_sim"].item(), abs=1e-6)
    with pytest.raises(ValueError, match="1 \\+ K"):
        similarity_stats(torch.zeros(3, 1), t)


def test_alignment_is_zero_for_identical_views_and_four_for_opposite_ones():
    z = F.normalize(torch.randn(10, 6), dim=1)
    assert alignment(z, z).item() == 0.0
    assert alignment(z, -z).item() == pytest.approx(4.0, rel=1e-6)


def test_alignment_matches_its_definition():
    z1, z2 = F.normalize(torch.randn(12, 5), dim=1), F.normalize(torch.randn(12, 5), dim=1)
    expected = ((z1.double() - z2.double()).norm(dim=1) ** 2).mean().item()
    assert alignment(z1, z2).item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="two views"):
        alignment(z1, z2[:3])


def test_uniformity_matches_its_definition_over_pairs():
    z = F.normalize(torch.randn(9, 4), dim=1).double()
    pairs = [(i, j) for i in range(9) for j in range(i + 1, 9)]
    expected = math.log(sum(math.exp(-2 * (z[i] - z[j]).pow(2).sum().item()) for i, j in pairs) / len(pairs))
    assert uniformity(z.float()).item() == pytest.approx(expected, rel=1e-5)


def test_uniformity_is_zero_when_collapsed_and_lower_when_spread():
    collapsed = F.normalize(torch.ones(8, 4), dim=1)
    assert uniformity(collapsed).item() == pytest.approx(0.0, abs=1e-6)
    spread = F.normalize(torch.randn(64, 4), dim=1)
    assert uniformity(spread).item() < -1.0
    with pytest.raises(ValueError, match="at least 2"):
        uniformity(collapsed[:1])


@pytest.mark.parametrize("chunk_numel", [1, 7, 10**9])
def test_drift_does_not_depend_on_how_parameters_are_grouped(chunk_numel):
    online, target = _pair()
    expected = parameter_drift(online, target, chunk_numel=10**9).item()
    assert parameter_drift(online, target, chunk_numel=chunk_numel).item() == pytest.approx(expected, rel=1e-6)
