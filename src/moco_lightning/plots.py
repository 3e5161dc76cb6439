"""The pictures of a run: a 2-D map of embeddings, training curves, a sweep heatmap (matplotlib, no pyplot).

Each function takes plain arrays and returns a :class:`matplotlib.figure.Figure` built without ``pyplot`` (no
global state, no display needed); :func:`save_figure` writes it as a PNG. The callers gather the data:
:class:`~moco_lightning.eval.embedding_map.EmbeddingMap` (during training), ``moco-plot``
(:mod:`moco_lightning.cli.plot`) and ``moco-sweep-report`` (:mod:`moco_lightning.cli.sweep_report`).
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

__all__ = ["CURVE_PANELS", "PROJECTIONS", "embedding_map_figure", "project_2d", "save_figure",
           "sweep_curves_figure", "sweep_heatmap_figure", "training_curves_figure"]

#: 2-D projections of :func:`project_2d`; "auto" is UMAP when ``umap-learn`` is installed, else t-SNE.
PROJECTIONS = ("auto", "tsne", "umap", "pca")

#: The panels of the training curves: (title, [(metric name in metrics.csv, legend label, scale)]).
CURVE_PANELS: tuple[tuple[str, tuple[tuple[str, str, float], ...]], ...] = (
    ("InfoNCE loss", (("train/loss", "train", 1.0),)),
    ("kNN top-1 (%)", (("val/knn_top1", "kNN top-1", 100.0), ("train/online_linear_top1", "online linear", 100.0))),
    ("learning rate", (("train/lr", "lr", 1.0),)),
    ("key-encoder momentum m", (("train/momentum", "m", 1.0),)),
    ("key-encoder drift ||θk − θq|| / ||θq||", (("dictionary/key_drift", "drift", 1.0),)),
    ("age of the queue's keys (steps)", (("dictionary/key_age_max", "oldest", 1.0),
                                         ("dictionary/key_age_mean", "mean", 1.0))),
    ("cosine similarity of queries", (("train/pos_sim", "positive", 1.0), ("train/neg_sim", "negatives", 1.0),
                                      ("dictionary/hardest_neg_sim", "hardest negative", 1.0))),
    ("alignment / uniformity (lower is better)", (("val/alignment", "alignment", 1.0),
                                                  ("val/uniformity", "uniformity", 1.0))),
)


def project_2d(features: np.ndarray, method: str = "auto", seed: int = 0) -> tuple[np.ndarray, str]:
    """Project ``(N, D)`` features to ``(N, 2)``; returns the coordinates and the method used.

    The rows are L2-normalised first (the kNN monitor compares cosine similarities). ``"tsne"`` is
    scikit-learn's t-SNE (perplexity 30, or less for small N); ``"umap"`` needs ``pip install umap-learn``;
    ``"pca"`` the two leading principal components; ``"auto"`` = UMAP if installed, else t-SNE.
    """
    if method not in PROJECTIONS:
        raise ValueError(f"unknown projection {method!r}; use one of {', '.join(PROJECTIONS)}")
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 3:
        raise ValueError(f"need (N, D) features with N >= 3 to draw a map, got shape {x.shape}")
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    if method == "auto":
        method = "umap" if importlib.util.find_spec("umap") is not None else "tsne"
    if method == "umap":
        if importlib.util.find_spec("umap") is None:
            raise ValueError("projection 'umap' needs the umap-learn package: pip install umap-learn "
                             "(or use 'tsne')")
        import umap

        reducer = umap.UMAP(n_components=2, n_neighbors=min(15, x.shape[0] - 1), random_state=seed)
        return np.asarray(reducer.fit_transform(x)), "UMAP"
    if method == "pca":
        from sklearn.decomposition import PCA

        return PCA(n_components=2).fit_transform(x), "PCA"
    from sklearn.manifold import TSNE

    perplexity = min(30.0, (x.shape[0] - 1) / 3)  # t-SNE needs perplexity < N
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed)
    return tsne.fit_transform(x), "t-SNE"


def embedding_map_figure(coords: np.ndarray, labels: Sequence[int] | np.ndarray, title: str = "",
                         class_names: Sequence[str] | None = None) -> Figure:
    """A scatter plot of 2-D points coloured by label, one legend entry per class (named by ``class_names``).

    Labels that are all negative (unlabelled images) give one colour and no legend.
    """
    coords, labels = np.asarray(coords), np.asarray(labels)
    fig = Figure(figsize=(5.2, 4.6), layout="constrained")
    ax = fig.subplots()
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=10)
    if labels.size and (labels < 0).all():  # unlabelled images: one colour, no legend
        ax.scatter(coords[:, 0], coords[:, 1], s=9, color="tab:blue", linewidths=0)
        return fig
    classes = np.unique(labels)
    cmap = _colormap("tab10" if len(classes) <= 10 else "tab20")
    for i, c in enumerate(classes):
        pick = labels == c
        name = class_names[int(c)] if class_names is not None else str(c)
        ax.scatter(coords[pick, 0], coords[pick, 1], s=9, color=cmap(i % cmap.N), label=name, linewidths=0)
    if len(classes) <= 20:
        ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, markerscale=1.5, frameon=False)
    return fig


def training_curves_figure(series: Mapping[str, tuple[Sequence[float], Sequence[float]]], title: str = "",
                           panels: Sequence[tuple[str, Sequence[tuple[str, str, float]]]] = CURVE_PANELS) -> Figure:
    """One panel per group of :data:`CURVE_PANELS` that has data; x is the optimizer step.

    Args:
        series: metric name -> ``(steps, values)``, e.g. from ``csv/metrics.csv``.
        title: the figure's title (the run folder).
        panels: which metrics share a panel (default :data:`CURVE_PANELS`).

    """
    present = [(name, [m for m in metrics if m[0] in series and len(series[m[0]][0])]) for name, metrics in panels]
    present = [(name, metrics) for name, metrics in present if metrics]
    if not present:
        raise ValueError(f"no metric to plot: none of {[m[0] for _, ms in panels for m in ms]} has a value")
    columns = 2 if len(present) > 1 else 1
    rows = math.ceil(len(present) / columns)
    fig = Figure(figsize=(5.0 * columns, 2.6 * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, columns, squeeze=False)).ravel()
    for ax, (name, metrics) in zip(axes, present):
        for metric, label, scale in metrics:
            steps, values = series[metric]
            _plot(ax, steps, np.asarray(values, dtype=float) * scale, label)
        _finish_panel(ax, name, legend=len(metrics) > 1)
    for ax in axes[len(present):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def _plot(ax, steps: Sequence[float], values: Sequence[float], label: str) -> None:  # noqa: ANN001 - an Axes
    """One curve; sparse (epoch-level) series show their points."""
    ax.plot(steps, values, label=label, marker="o" if len(steps) <= 50 else None, markersize=3)


def _finish_panel(ax, title: str, legend: bool) -> None:  # noqa: ANN001 - an Axes
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("optimizer step", fontsize=8)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
    if legend:
        ax.legend(fontsize=8)


def sweep_curves_figure(runs: Mapping[str, Mapping[str, tuple[Sequence[float], Sequence[float]]]],
                        metrics: Sequence[str], title: str = "") -> Figure:
    """One panel per metric, one line per run of a sweep: how the jobs compare over training.

    Dense (per-step) series are shown as a running mean over about 1/50 of their length, so that two noisy curves
    can be told apart; sparse (per-epoch) ones as points. ``runs``: run label -> metric name -> ``(steps, values)``.
    """
    if not any(runs[run].get(metric) and len(runs[run][metric][0]) for run in runs for metric in metrics):
        raise ValueError(f"no metric to plot: none of {list(metrics)} has a value in any job")
    fig = Figure(figsize=(5.0 * len(metrics), 3.2), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(metrics), squeeze=False)).ravel()
    for ax, metric in zip(axes, metrics):
        for label, series in runs.items():
            if metric not in series or not len(series[metric][0]):
                continue
            steps, values = np.asarray(series[metric][0], float), np.asarray(series[metric][1], float)
            if len(steps) > 50:
                window = max(1, len(values) // 50)
                values = np.convolve(values, np.ones(window) / window, mode="valid")
                steps = steps[window - 1:]
            _plot(ax, steps, values * 100.0 if _is_fraction(metric) else values, label)
        _finish_panel(ax, metric + (" (%)" if _is_fraction(metric) else ""), legend=True)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def _is_fraction(metric: str) -> bool:
    """Accuracies are logged as fractions and shown in per cent."""
    return "acc" in metric or "top1" in metric or "top5" in metric


def sweep_heatmap_figure(grid: np.ndarray, x_values: Sequence[str], y_values: Sequence[str], x_key: str,
                         y_key: str, metric: str, counts: np.ndarray | None = None, scale: float = 100.0) -> Figure:
    """A heatmap of ``metric`` over two swept keys, each cell annotated; missing cells grey and marked "n/a".

    ``grid`` is ``(len(y_values), len(x_values))``, NaN where no job finished; ``counts`` the jobs per cell (shown
    as "(n=2)" where more than one); ``scale`` multiplies annotations and colours (100: fractions as percent).
    """
    grid = np.asarray(grid, dtype=float) * scale
    fig = Figure(figsize=(1.2 * len(x_values) + 2.8, 0.7 * len(y_values) + 1.8), layout="constrained")
    ax = fig.subplots()
    cmap = _colormap("viridis").with_extremes(bad="0.85")
    finite = grid[np.isfinite(grid)]
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, aspect="auto",
                      vmin=finite.min() if finite.size else None, vmax=finite.max() if finite.size else None)
    ax.set_xticks(range(len(x_values)), [str(v) for v in x_values], fontsize=8)
    ax.set_yticks(range(len(y_values)), [str(v) for v in y_values], fontsize=8)
    ax.set_xlabel(x_key, fontsize=9)
    ax.set_ylabel(y_key, fontsize=9)
    middle = (finite.min() + finite.max()) / 2 if finite.size else 0.0
    for (row, col), value in np.ndenumerate(grid):
        if not np.isfinite(value):
            text, colour = "n/a", "black"
        else:
            text = f"{value:.1f}" if scale == 100.0 else f"{value:.3g}"
            if counts is not None and counts[row, col] > 1:
                text += f"\n(n={int(counts[row, col])})"
            colour = "white" if value < middle else "black"
        ax.text(col, row, text, ha="center", va="center", fontsize=8, color=colour)
    fig.colorbar(image, ax=ax, label=f"{metric}" + (" (%)" if scale == 100.0 else ""))
    ax.set_title(f"final {metric} over {x_key} x {y_key}", fontsize=9)
    return fig


def save_figure(fig: Figure, path: str | Path, dpi: int = 100) -> Path:
    """Write ``fig`` as a PNG (parent folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png")
    return path


def _colormap(name: str):  # noqa: ANN202 - a matplotlib Colormap
    from matplotlib import colormaps

    return colormaps[name]
