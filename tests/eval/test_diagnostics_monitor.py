"""The diagnostics and the embedding map in a real (tiny) fit on 8 px digits: what is logged, when, and at what cost
to the run's random stream (none)."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from moco_lightning import MoCo
from moco_lightning.data import DigitsDataModule
from moco_lightning.eval.diagnostics_monitor import DiagnosticsMonitor
from moco_lightning.eval.embedding_map import EmbeddingMap

STEPS_PER_EPOCH, EPOCHS, BATCH, QUEUE = 2, 2, 16, 32


def _fit(folder: Path, diagnostics: bool, embedding_map: bool) -> MoCo:
    L.seed_everything(0)
    model = MoCo("resnet18", dim=8, queue_size=QUEUE, momentum=0.9, temperature=0.2, lr=0.01,
                 lr_schedule="cosine", cifar_stem=False)
    # every_n_epochs=1 stands for the kNN monitor's cadence (test_cadence.py), without the cost of kNN runs
    callbacks = [DiagnosticsMonitor(enabled=diagnostics, every_n_epochs=1, max_samples=200)]
    if embedding_map:
        callbacks.append(EmbeddingMap(dirpath=str(folder / "maps"), every_n_runs=1, every_n_epochs=1, method="pca",
                                      max_points=100))
    trainer = L.Trainer(max_epochs=EPOCHS, limit_train_batches=STEPS_PER_EPOCH, log_every_n_steps=2,
                        accelerator="cpu", devices=1, logger=CSVLogger(folder, name="", version=""),
                        callbacks=callbacks, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=BATCH, image_size=8))
    return model


def _columns(folder: Path) -> dict[str, list[float]]:
    with open(folder / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    return {name: [float(r[name]) for r in rows if r[name]] for name in rows[0]}


@pytest.fixture(autouse=True)
def one_thread(_seed_and_threads):
    """After the suite's thread setting: two threads on two busy shared cores measured 10-20x slower per forward."""
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[Path, MoCo]]:
    on, off = tmp_path_factory.mktemp("on"), tmp_path_factory.mktemp("off")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a module fixture is set up before the function fixtures above
    try:
        return {"on": (on, _fit(on, True, True)), "off": (off, _fit(off, False, False))}
    finally:
        torch.set_num_threads(threads)


@pytest.mark.timeout(120)
def test_dictionary_diagnostics_are_logged_at_every_logging_step(runs):
    columns = _columns(runs["on"][0])
    steps = EPOCHS * STEPS_PER_EPOCH // 2  # log_every_n_steps=2
    for name in ("key_drift", "key_age_max", "key_age_mean", "sim_gap", "hardest_neg_sim"):
        values = columns[f"dictionary/{name}"]
        assert len(values) == steps and all(torch.isfinite(torch.tensor(values)))
    assert all(0 < d < 1 for d in columns["dictionary/key_drift"])
    # K = 2 batches: after step t the queue holds the keys of steps t-1 and t, so ages are 1 and 0
    assert columns["dictionary/key_age_max"] == [1.0] * steps
    assert columns["dictionary/key_age_mean"] == [0.5] * steps


@pytest.mark.timeout(120)
def test_alignment_and_uniformity_are_logged_at_every_monitor_epoch(runs):
    columns = _columns(runs["on"][0])
    assert len(columns["val/alignment"]) == len(columns["val/uniformity"]) == EPOCHS
    assert all(0.0 <= a <= 4.0 for a in columns["val/alignment"])
    assert all(-4.0 <= u <= 0.0 for u in columns["val/uniformity"])  # log E exp(-2 d^2) with d^2 in [0, 4]


@pytest.mark.timeout(120)
def test_queue_slots_carry_the_optimizer_step_of_their_keys(runs):
    model = runs["on"][1]
    last = EPOCHS * STEPS_PER_EPOCH
    assert sorted(set(model.key_queue.written_at.tolist())) == [last - 1, last]


@pytest.mark.timeout(120)
def test_off_switch_logs_nothing_and_monitors_leave_the_random_stream_alone(runs):
    columns = _columns(runs["off"][0])
    assert not any(name.startswith("dictionary/") or name in ("val/alignment", "val/uniformity") for name in columns)
    (_, with_monitors), (_, without) = runs["on"], runs["off"]
    for (name, a), b in zip(with_monitors.state_dict().items(), without.state_dict().values()):
        assert torch.equal(a, b), f"{name} differs: a monitor changed the training run"


@pytest.mark.timeout(120)
def test_embedding_maps_are_drawn_every_n_runs_and_at_the_end(runs):
    from matplotlib.image import imread

    maps = runs["on"][0] / "maps"
    assert sorted(p.name for p in maps.glob("*.png")) == ["epoch001.png", "final.png"]  # epoch 2 is the final
    image = imread(maps / "final.png")
    assert image.shape[0] > 200 and image.shape[1] > 200
    assert image[..., :3].std() > 0.05  # not a blank canvas


@pytest.mark.timeout(60)
@pytest.mark.parametrize("batch_augmentation", [True, False])
@pytest.mark.parametrize("cache_bytes", [DiagnosticsMonitor.VIEW_CACHE_BYTES, 0])
def test_alignment_views_are_the_same_at_every_run_whether_kept_or_not(cache_bytes, batch_augmentation, monkeypatch):
    from types import SimpleNamespace

    monkeypatch.setattr(DiagnosticsMonitor, "VIEW_CACHE_BYTES", cache_bytes)
    dm = DigitsDataModule(batch_size=BATCH, image_size=8, batch_augmentation=batch_augmentation)
    trainer = SimpleNamespace(datamodule=dm, precision_plugin=None)
    model = MoCo("resnet18", dim=8, queue_size=QUEUE, cifar_stem=False)
    monitor = DiagnosticsMonitor(max_samples=64)
    first, again = monitor.representation_metrics(trainer, model), monitor.representation_metrics(trainer, model)
    assert first == again == DiagnosticsMonitor(max_samples=64).representation_metrics(trainer, model)
    assert (monitor._view_cache is not None) == (cache_bytes > 0)


def test_moco_v3_gets_the_drift_of_its_momentum_encoder_and_nothing_queue_specific():
    from moco_lightning import MoCoV3

    model = MoCoV3("resnet18", dim=8, mlp_dim=16)
    with torch.no_grad():
        model.momentum_encoder.head[0].weight.add_(1.0)
    metrics = DiagnosticsMonitor().step_metrics(model, {"loss": torch.tensor(1.0)}, step=3)
    assert set(metrics) == {"dictionary/key_drift"} and float(metrics["dictionary/key_drift"]) > 0
