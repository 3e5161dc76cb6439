import importlib.util

import numpy as np
import pytest
from matplotlib.image import imread

from moco_lightning.plots import (
    embedding_map_figure,
    project_2d,
    save_figure,
    sweep_heatmap_figure,
    training_curves_figure,
)


def _open(path):
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert image[..., :3].std() > 0.05, "blank image"
    return image


def _clusters(n_per_class=15, classes=3, dim=6):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(classes, dim)) * 5
    labels = np.repeat(np.arange(classes), n_per_class)
    return centres[labels] + rng.normal(size=(len(labels), dim)), labels


@pytest.mark.parametrize(("method", "n_per_class"), [("tsne", 4), ("pca", 15)])  # t-SNE is slow: few points
def test_projection_gives_two_coordinates_per_point(method, n_per_class):
    features, _ = _clusters(n_per_class)
    coords, used = project_2d(features, method, seed=0)
    assert coords.shape == (len(features), 2) and np.isfinite(coords).all()
    assert used == {"tsne": "t-SNE", "pca": "PCA"}[method]


def test_projection_names_what_is_wrong():
    with pytest.raises(ValueError, match="unknown projection 'mds'"):
        project_2d(np.zeros((5, 2)), "mds")
    with pytest.raises(ValueError, match="N >= 3"):
        project_2d(np.zeros((2, 4)), "pca")


@pytest.mark.skipif(importlib.util.find_spec("umap") is not None, reason="umap-learn is installed")
def test_umap_without_umap_learn_says_how_to_install_it():
    with pytest.raises(ValueError, match="pip install umap-learn"):
        project_2d(np.random.default_rng(0).normal(size=(10, 3)), "umap")


def test_embedding_map_is_a_png_with_one_colour_per_class(tmp_path):
    features, labels = _clusters()
    coords, _ = project_2d(features, "pca")
    path = save_figure(embedding_map_figure(coords, labels, "test"), tmp_path / "map.png")
    _open(path)


def test_training_curves_draw_only_the_panels_with_data(tmp_path):
    steps = list(range(10))
    series = {"train/loss": (steps, [5 - 0.1 * s for s in steps]), "val/knn_top1": ([4, 9], [0.5, 0.6])}
    figure = training_curves_figure(series)
    assert [ax.get_title() for ax in figure.axes if ax.get_visible()] == ["InfoNCE loss", "kNN top-1 (%)"]
    _open(save_figure(figure, tmp_path / "curves.png"))
    with pytest.raises(ValueError, match="no metric to plot"):
        training_curves_figure({"something/else": ([0], [1.0])})


def test_sweep_heatmap_marks_missing_cells(tmp_path):
    grid = np.array([[0.8, np.nan], [0.85, 0.9]])
    figure = sweep_heatmap_figure(grid, ["0.99", "0.999"], ["64", "256"], "model.momentum", "model.queue_size",
                                  "val/knn_top1", counts=np.array([[1, 0], [2, 1]]))
    texts = [t.get_text() for t in figure.axes[0].texts]
    assert texts == ["80.0", "n/a", "85.0\n(n=2)", "90.0"]
    _open(save_figure(figure, tmp_path / "heatmap.png"))
