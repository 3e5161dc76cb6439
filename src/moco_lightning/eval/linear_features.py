"""A linear probe that fits a CPU budget: logistic regression on frozen features, fitted by full-batch L-BFGS.

The official protocols (:mod:`moco_lightning.eval.linear`) train by SGD on augmented images for 90-100 epochs:
hours on a CPU. This probe embeds the *un-augmented* images once, standardises the features, chooses the L2
strength on a stratified held-out part of the training set (:func:`choose_l2`), refits and scores. Written in torch
rather than with scikit-learn (whose ``C`` is ``1 / (n_train * l2)``): its held-out split and ``ddof=0``
standardisation would change the recorded numbers, and the fit runs on the features' device.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from moco_lightning.eval.features import eval_mode, extract_features

__all__ = ["DEFAULT_L2_GRID", "LogisticRegression", "ProbeResult", "choose_l2", "feature_probe",
           "fit_logistic_regression", "flatten_pixels", "frozen_features", "probe_features", "standardize"]

#: L2 strengths tried by default (1e-6 ... 1e-1, one per decade).
DEFAULT_L2_GRID: tuple[float, ...] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def flatten_pixels(images: torch.Tensor) -> torch.Tensor:
    """The "no encoder" features: each image flattened to one vector, ``(N, C*H*W)``."""
    return images.flatten(1)


@torch.no_grad()
def frozen_features(
    embed_fn: Callable[[torch.Tensor], torch.Tensor],
    loader: Iterable[Any],
    module: torch.nn.Module | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features ``(N, D)`` (float32, CPU) and labels ``(N,)`` of ``loader``, ``module`` in eval mode."""
    with eval_mode(module):
        features, labels = extract_features(lambda x: embed_fn(x).float().cpu(), loader, device=device)
    return features, labels.cpu()


def standardize(train: torch.Tensor, *others: torch.Tensor, eps: float = 1e-6) -> list[torch.Tensor]:
    """Subtract the mean and divide by the std of ``train`` (per feature) in ``train`` and each of ``others``.

    Features that are constant on ``train`` (std below ``eps``, e.g. always-black border pixels) are centred only.
    """
    mean = train.mean(0, keepdim=True)
    std = train.std(0, keepdim=True)
    std = torch.where(std < eps, torch.ones_like(std), std)
    return [(x - mean) / std for x in (train, *others)]


@dataclass
class LogisticRegression:
    """A fitted multinomial logistic regression: ``logits = x @ weight.T + bias``.

    Attributes:
        weight: ``(C, D)``.
        bias: ``(C,)``.
        l2: the L2 strength it was fitted with.
        iterations: L-BFGS iterations run.
        converged: whether L-BFGS stopped on its tolerances before ``max_iter``.
        loss: the final value of the objective.

    """

    weight: torch.Tensor
    bias: torch.Tensor
    l2: float
    iterations: int
    converged: bool
    loss: float

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Class scores ``(N, C)`` of features ``x`` (standardised like the training features)."""
        return x.to(self.weight.dtype) @ self.weight.T + self.bias

    def accuracy(self, x: torch.Tensor, y: torch.Tensor, top_k: int = 1) -> float:
        """Top-``k`` accuracy (a fraction) on features ``x`` with labels ``y``."""
        if len(y) == 0:
            return float("nan")
        k = min(top_k, self.weight.shape[0])
        top = self.logits(x).topk(k, dim=1).indices
        return float((top == y.to(top.device).unsqueeze(1)).any(1).double().mean())


def fit_logistic_regression(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    l2: float,
    max_iter: int = 500,
    tolerance: float = 1e-6,
    init: LogisticRegression | None = None,
) -> LogisticRegression:
    """Minimise ``mean cross-entropy + l2 / 2 * ||W||^2`` over ``(W, b)`` with full-batch L-BFGS.

    Args:
        x: ``(N, D)`` features (standardise them first); the fit runs in their dtype (float32 or float64).
        y: ``(N,)`` integer labels in ``[0, num_classes)``.
        num_classes: C.
        l2: L2 strength on the weights (not the bias), >= 0.
        max_iter: L-BFGS iterations at most.
        tolerance: stop when the largest gradient entry falls below it.
        init: start from this fit (a warm start along an L2 grid); default zeros.

    """
    if x.ndim != 2 or y.shape != (x.shape[0],):
        raise ValueError(f"need features (N, D) and labels (N,), got {tuple(x.shape)} and {tuple(y.shape)}")
    if l2 < 0:
        raise ValueError(f"l2 must be >= 0, got {l2}")
    y = y.to(x.device, torch.long)
    if init is not None:
        weight = init.weight.detach().to(x).clone().requires_grad_(True)
        bias = init.bias.detach().to(x).clone().requires_grad_(True)
    else:
        weight = torch.zeros(num_classes, x.shape[1], dtype=x.dtype, device=x.device, requires_grad=True)
        bias = torch.zeros(num_classes, dtype=x.dtype, device=x.device, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, tolerance_grad=tolerance,
                                  tolerance_change=1e-9, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight.T + bias, y) + 0.5 * l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
        final = closure()
    iterations = int(optimizer.state[weight].get("n_iter", 0))
    return LogisticRegression(weight=weight.detach(), bias=bias.detach(), l2=float(l2), iterations=iterations,
                              converged=iterations < max_iter, loss=float(final.detach()))


def _stratified_holdout(y: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices ``(fit, held_out)``: ``fraction`` of each class held out (at least one of a class of 2 or more)."""
    generator = torch.Generator().manual_seed(seed)
    fit, held = [], []
    for c in torch.unique(y):
        members = torch.nonzero(y == c).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        n_held = min(len(members) - 1, max(1, round(fraction * len(members)))) if len(members) > 1 else 0
        held.append(members[:n_held])
        fit.append(members[n_held:])
    return torch.sort(torch.cat(fit)).values, torch.sort(torch.cat(held)).values


def choose_l2(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    grid: Sequence[float] = DEFAULT_L2_GRID,
    holdout_fraction: float = 0.2,
    seed: int = 0,
    max_iter: int = 500,
    tolerance: float = 1e-6,
    patience: int | None = 2,
) -> tuple[float, dict[float, dict[str, float]]]:
    """Pick the L2 strength of ``grid`` that scores best on a stratified held-out part of ``(x, y)``.

    Best = highest held-out top-1, then lower cross-entropy. The grid is walked from strongest to weakest, each fit
    warm-started from the last; with ``patience`` the walk stops after that many strengths in a row below the best.

    Returns:
        ``(best_l2, {l2: {"top1": ..., "loss": ...}})`` for the strengths fitted, accuracies as fractions.

    """
    best, scores, _ = _walk_l2_grid(x, y, num_classes, grid, holdout_fraction, seed, max_iter, tolerance, patience)
    return best, scores


def _walk_l2_grid(x: torch.Tensor, y: torch.Tensor, num_classes: int, grid: Sequence[float], holdout_fraction: float,
                  seed: int, max_iter: int, tolerance: float, patience: int | None,
                  ) -> tuple[float, dict[float, dict[str, float]], LogisticRegression]:
    """:func:`choose_l2`, and the fit of the best strength (a warm start for the refit on all the data)."""
    if not grid:
        raise ValueError("the L2 grid is empty; give at least one strength, e.g. [1e-4]")
    if not 0.0 < holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in (0, 1), got {holdout_fraction}")
    if patience is not None and patience < 1:
        raise ValueError(f"patience must be >= 1 or None (the whole grid), got {patience}")
    fit_idx, held_idx = _stratified_holdout(y, holdout_fraction, seed)
    if len(held_idx) == 0:
        raise ValueError("no class has 2 training samples or more: nothing can be held out to choose the L2 strength")
    x_fit, x_held = standardize(x[fit_idx], x[held_idx])
    y_fit, y_held = y[fit_idx], y[held_idx].to(x_held.device, torch.long)
    scores: dict[float, dict[str, float]] = {}
    fits: dict[float, LogisticRegression] = {}
    best: float | None = None
    worse = 0
    previous = None
    for l2 in sorted((float(v) for v in grid), reverse=True):
        previous = fit_logistic_regression(x_fit, y_fit, num_classes, l2, max_iter, tolerance, init=previous)
        loss = float(F.cross_entropy(previous.logits(x_held), y_held))
        scores[l2] = {"top1": previous.accuracy(x_held, y_held), "loss": loss}
        fits[l2] = previous
        if best is None or (scores[l2]["top1"], -loss) > (scores[best]["top1"], -scores[best]["loss"]):
            best, worse = l2, 0
        else:
            worse += 1
            if patience is not None and worse >= patience:
                break
    assert best is not None
    return best, dict(sorted(scores.items())), fits[best]


@dataclass
class ProbeResult:
    """What :func:`probe_features` measured; accuracies are fractions in [0, 1]."""

    top1: float
    top5: float
    train_top1: float
    l2: float
    holdout: dict[float, dict[str, float]]
    lbfgs_iterations: int
    converged: bool
    feature_dim: int
    num_train: int
    num_eval: int
    seconds: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: the held-out scores keyed by the L2 strength written as text."""
        out = dict(self.__dict__)
        out["holdout"] = {f"{k:g}": v for k, v in self.holdout.items()}
        return out


def probe_features(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    eval_x: torch.Tensor,
    eval_y: torch.Tensor,
    num_classes: int | None = None,
    l2_grid: Sequence[float] = DEFAULT_L2_GRID,
    holdout_fraction: float = 0.2,
    seed: int = 0,
    max_iter: int = 500,
    tolerance: float = 1e-6,
    dtype: torch.dtype = torch.float32,
    patience: int | None = 2,
) -> ProbeResult:
    """Choose L2 on held-out training features, refit on all of them (warm-started), score the evaluation features.

    Args:
        train_x: training features ``(N, D)``.
        train_y: their labels ``(N,)``.
        eval_x: evaluation features ``(M, D)`` (the reported top-1).
        eval_y: their labels ``(M,)``.
        num_classes: C; default the largest label + 1.
        l2_grid: L2 strengths to choose from (one value: no choice, no held-out fits).
        holdout_fraction: share of each class held out to choose L2.
        seed: seed of the held-out split.
        max_iter: L-BFGS iterations per fit at most.
        tolerance: L-BFGS stops when the largest gradient entry is below it.
        dtype: float32 or float64 for the fits.
        patience: see :func:`choose_l2`; None = the whole grid.

    """
    if train_x.shape[1] != eval_x.shape[1]:
        raise ValueError(f"training features have {train_x.shape[1]} dims, evaluation features {eval_x.shape[1]}")
    if num_classes is None:
        num_classes = int(max(int(train_y.max()), int(eval_y.max()))) + 1
    train_x, eval_x = train_x.to(dtype), eval_x.to(dtype)
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    if len(l2_grid) == 1:
        l2, holdout, init = float(l2_grid[0]), {}, None
    else:
        l2, holdout, init = _walk_l2_grid(train_x, train_y, num_classes, l2_grid, holdout_fraction, seed, max_iter,
                                          tolerance, patience)
    seconds["choose_l2"] = time.perf_counter() - start
    start = time.perf_counter()
    train_s, eval_s = standardize(train_x, eval_x)
    model = fit_logistic_regression(train_s, train_y, num_classes, l2, max_iter, tolerance, init=init)
    seconds["refit"] = time.perf_counter() - start
    return ProbeResult(top1=model.accuracy(eval_s, eval_y), top5=model.accuracy(eval_s, eval_y, top_k=5),
                       train_top1=model.accuracy(train_s, train_y), l2=l2, holdout=holdout,
                       lbfgs_iterations=model.iterations, converged=model.converged, feature_dim=int(train_x.shape[1]),
                       num_train=len(train_y), num_eval=len(eval_y), seconds=seconds)


def feature_probe(
    embed_fn: Callable[[torch.Tensor], torch.Tensor] | None,
    datamodule: Any,
    module: torch.nn.Module | None = None,
    device: torch.device | str | None = None,
    **probe_kwargs: Any,
) -> ProbeResult:
    """The whole probe on a datamodule: embed its un-augmented train and val sets once, then :func:`probe_features`.

    Args:
        embed_fn: maps an image batch to features; ``None`` = raw pixels (:func:`flatten_pixels`).
        datamodule: gives ``eval_train_dataloader()``, ``eval_val_dataloader()`` and ``num_classes`` (set up).
        module: the network behind ``embed_fn``, kept in eval mode during the pass.
        device: where images are sent before ``embed_fn``.
        **probe_kwargs: :func:`probe_features` options (``l2_grid``, ``holdout_fraction``, ``dtype``...).

    """
    embed = embed_fn if embed_fn is not None else flatten_pixels
    start = time.perf_counter()
    train_x, train_y = frozen_features(embed, datamodule.eval_train_dataloader(), module, device)
    eval_x, eval_y = frozen_features(embed, datamodule.eval_val_dataloader(), module, device)
    extract_seconds = time.perf_counter() - start
    probe_kwargs.setdefault("num_classes", getattr(datamodule, "num_classes", None) or None)
    result = probe_features(train_x, train_y, eval_x, eval_y, **probe_kwargs)
    result.seconds = {"features": extract_seconds, **result.seconds}
    result.seconds["total"] = math.fsum(result.seconds.values())
    return result
