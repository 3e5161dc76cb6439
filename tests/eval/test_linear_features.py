"""The CPU-budget linear probe: L-BFGS logistic regression, the held-out choice of L2, the frozen feature pass."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from eval_helpers import IMAGE_SIZE, NUM_CLASSES, BlobsDataModule
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from moco_lightning.eval.linear_features import (
    choose_l2,
    feature_probe,
    fit_logistic_regression,
    frozen_features,
    probe_features,
    standardize,
)


def gaussian_classes(n: int, dim: int, separation: float, seed: int, label_noise: float = 0.0,
                     sample_seed: int | None = None):
    """``n`` points of 3 Gaussian classes (unit variance) with means ``separation`` x N(0, 1) drawn from ``seed``.

    ``sample_seed`` (default ``seed``) draws the points: another one gives new points of the same classes.
    """
    g = torch.Generator().manual_seed(seed)
    means = separation * torch.randn(3, dim, generator=g)
    if sample_seed is not None:
        g.manual_seed(sample_seed)
    y = torch.arange(n) % 3
    x = means[y] + torch.randn(n, dim, generator=g)
    if label_noise:
        flip = torch.rand(n, generator=g) < label_noise
        y = torch.where(flip, torch.randint(0, 3, (n,), generator=g), y)
    return x, y


def test_lbfgs_separates_a_separable_problem_and_generalises():
    train_x, train_y = gaussian_classes(120, 4, separation=6.0, seed=0)
    test_x, test_y = gaussian_classes(60, 4, separation=6.0, seed=0, sample_seed=1)  # the same classes, new points
    result = probe_features(train_x, train_y, test_x, test_y, l2_grid=[1e-3], max_iter=200)
    assert result.train_top1 == 1.0 and result.top1 == 1.0 and result.converged
    assert result.feature_dim == 4 and (result.num_train, result.num_eval) == (120, 60)
    chance = gaussian_classes(60, 4, separation=6.0, seed=5)  # other class means: the fit must not transfer
    assert probe_features(train_x, train_y, *chance, l2_grid=[1e-3], max_iter=200).top1 < 0.9


def test_the_fit_is_the_minimum_of_the_penalised_objective():
    """Matches scikit-learn's multinomial logistic regression with C = 1 / (n l2) (same objective, bias free)."""
    from sklearn.linear_model import LogisticRegression

    x, y = gaussian_classes(90, 5, separation=1.0, seed=1)
    x = standardize(x.double())[0]
    l2 = 1e-2
    ours = fit_logistic_regression(x, y, 3, l2, max_iter=500, tolerance=1e-9)
    theirs = LogisticRegression(C=1.0 / (len(y) * l2), tol=1e-10, max_iter=5000).fit(x.numpy(), y.numpy())
    scale = float(np.abs(theirs.coef_).max())
    # the softmax is invariant to a common shift of the biases: compare them centred
    np.testing.assert_allclose(ours.weight.numpy(), theirs.coef_, atol=1e-4 * scale)
    bias = ours.bias.numpy() - ours.bias.numpy().mean()
    np.testing.assert_allclose(bias, theirs.intercept_ - theirs.intercept_.mean(), atol=1e-4 * scale)
    weight = ours.weight.clone().requires_grad_(True)
    loss = F.cross_entropy(x @ weight.T + ours.bias, y) + 0.5 * l2 * weight.pow(2).sum()
    loss.backward()
    assert float(weight.grad.abs().max()) < 1e-5  # stationary (L-BFGS also stops when the loss stops changing)


def test_a_noisy_problem_gets_a_stronger_l2_than_a_clean_one():
    grid = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
    clean, noisy = [], []
    for seed in range(2):
        clean.append(choose_l2(*gaussian_classes(150, 5, 3.0, seed), 3, grid, seed=seed, max_iter=100)[0])
        noisy_x, noisy_y = gaussian_classes(150, 60, 0.3, seed, label_noise=0.2)  # 60 dims, 120 fitted points
        best, scores = choose_l2(noisy_x, noisy_y, 3, grid, seed=seed, max_iter=100, patience=None)
        noisy.append(best)
        assert set(scores) == set(grid) and scores[best]["top1"] == max(s["top1"] for s in scores.values())
    assert min(noisy) > max(clean)


def test_the_walk_down_the_grid_stops_when_the_held_out_score_keeps_falling():
    grid = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
    x, y = gaussian_classes(150, 60, 0.3, seed=0, label_noise=0.2)  # the strongest strength is best (test above)
    whole_best, whole = choose_l2(x, y, 3, grid, max_iter=100, patience=None)
    best, walked = choose_l2(x, y, 3, grid, max_iter=100, patience=1)
    assert set(whole) == set(grid) and len(walked) < len(grid)
    assert best == whole_best and all(walked[v] == whole[v] for v in walked)  # the same fits, fewer of them
    strongest_first = sorted(walked, reverse=True)
    assert strongest_first == sorted(grid, reverse=True)[: len(walked)]
    assert all(walked[v]["top1"] < walked[best]["top1"] or walked[v]["loss"] > walked[best]["loss"]
               for v in strongest_first[-1:])  # it stopped on a worse one


def test_the_held_out_part_is_stratified_and_bad_settings_fail_early():
    x, y = gaussian_classes(60, 3, 3.0, seed=0)
    with pytest.raises(ValueError, match="holdout_fraction"):
        choose_l2(x, y, 3, holdout_fraction=1.0)
    with pytest.raises(ValueError, match="grid is empty"):
        choose_l2(x, y, 3, grid=())
    one_each = torch.arange(3)
    with pytest.raises(ValueError, match="nothing can be held out"):
        choose_l2(torch.randn(3, 2), one_each, 3)


class _ConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                 nn.Flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def test_chunked_feature_pass_equals_one_pass_in_eval_mode_without_autograd():
    torch.manual_seed(0)
    model = _ConvBN()
    with torch.no_grad():  # move the BN statistics off their defaults, so train-mode batches would differ
        model(torch.randn(32, 3, IMAGE_SIZE, IMAGE_SIZE) * 3 + 1)
    model.train()
    x = torch.randn(37, 3, IMAGE_SIZE, IMAGE_SIZE)
    y = torch.arange(37) % NUM_CLASSES
    whole, whole_y = frozen_features(model, DataLoader(TensorDataset(x, y), batch_size=37), module=model)
    chunks, chunk_y = frozen_features(model, DataLoader(TensorDataset(x, y), batch_size=5), module=model)
    assert model.training and all(m.training for m in model.modules())  # modes given back
    assert not whole.requires_grad and whole.dtype == torch.float32 and whole.shape == (37, 8)
    torch.testing.assert_close(chunks, whole, rtol=1e-5, atol=1e-5 * float(whole.abs().max()))
    assert torch.equal(chunk_y, y) and torch.equal(whole_y, y)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(whole, model(x), rtol=1e-5, atol=1e-6)  # the eval-mode network, not train mode


def test_raw_pixels_go_through_the_same_probe():
    dm = BlobsDataModule()
    result = feature_probe(None, dm, l2_grid=[1e-4, 1e-2], max_iter=100)
    assert result.feature_dim == 3 * IMAGE_SIZE * IMAGE_SIZE and (result.num_train, result.num_eval) == (64, 32)
    assert result.top1 > 0.9  # the blobs are class patterns plus noise: linearly separable in pixels
    assert set(result.holdout) == {1e-4, 1e-2} and result.l2 in result.holdout
    assert set(result.seconds) == {"features", "choose_l2", "refit", "total"}
    as_json = result.as_dict()
    assert set(as_json["holdout"]) == {"0.0001", "0.01"} and as_json["top1"] == result.top1
