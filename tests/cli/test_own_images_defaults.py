"""Defaults for a folder of your own: workers from the machine, the my_images preset (a queue that fits: test_queue)."""

from __future__ import annotations

import os

import pytest

from moco_lightning import cpus as cpus_module
from moco_lightning.cli.config_checks import check_config
from moco_lightning.data import DigitsDataModule
from moco_lightning.data.base import auto_workers


@pytest.mark.parametrize(("cores", "processes", "expected"), [(2, 1, 1), (1, 1, 0), (16, 1, 15), (96, 8, 11),
                                                             (4, 8, 0)])
def test_auto_workers_share_the_cores_of_this_process(monkeypatch, cores, processes, expected):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    monkeypatch.setattr(cpus_module, "cgroup_cpu_quota", lambda *args: None)  # the test machine's own quota aside
    assert auto_workers(processes) == expected


def test_a_datamodule_with_auto_workers_uses_the_machines_cores(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(4)), raising=False)
    monkeypatch.setattr(cpus_module, "cgroup_cpu_quota", lambda *args: None)
    dm = DigitsDataModule(num_workers="auto", batch_size=16, image_size=8)
    assert dm.num_workers == 3 and dm.persistent_workers
    with pytest.raises(ValueError, match="num_workers=many must be an integer >= 0"):
        DigitsDataModule(num_workers="many")


def test_the_my_images_preset_composes_and_passes_the_checks(compose_train, tmp_path):
    cfg = compose_train(["experiment=my_images", f"data.data_dir={tmp_path}"])
    assert cfg.data._target_.endswith("ImageFolderDataModule") and cfg.data.num_workers == "auto"
    assert cfg.data.image_size == 96 and cfg.model.backbone == "resnet18" and not cfg.model.cifar_stem
    check_config(cfg)

