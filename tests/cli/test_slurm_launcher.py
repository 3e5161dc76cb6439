"""`hydra/launcher=slurm` composes to what Hydra's submitit launcher and submitit's sbatch writer expect."""

from __future__ import annotations

import shutil

import pytest
from hydra.utils import instantiate

pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="the submitit launcher is an optional extra")

MULTI_NODE = ["hydra/launcher=slurm", "trainer.num_nodes=2", "trainer.devices=8", "trainer.accelerator=gpu",
              "data.num_workers=10"]


def test_slurm_launcher_takes_nodes_tasks_and_gpus_from_the_trainer(compose_train):
    cfg = compose_train(MULTI_NODE, return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node, launcher.cpus_per_task) == (2, 8, 8, 10)
    assert launcher.max_num_timeout > 0 and launcher.signal_delay_s > 0  # requeue on preemption
    assert cfg.trainer.strategy == "auto"  # Lightning's auto: its own DDP over the 16 SLURM tasks


def test_sbatch_script_asks_for_two_nodes_of_eight_gpu_tasks(compose_train, monkeypatch, tmp_path):
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from omegaconf import OmegaConf

    cfg = compose_train([*MULTI_NODE, f"hydra.sweep.dir={tmp_path}"], return_hydra_config=True)
    launcher = instantiate(cfg.hydra.launcher)  # resolves the interpolations as the launcher does
    params = dict(launcher.params)
    # the launcher's own translation of its parameters into submitit's (SlurmLauncher.launch)
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")  # no srun here: pretend
    executor = submitit.AutoExecutor(cluster="slurm", folder=str(tmp_path / "%j"),
                                     slurm_max_num_timeout=params.pop("max_num_timeout"))
    params.pop("submitit_folder")
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    script = executor._executor._make_submission_file_text("python -u train.py", "uid")
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --cpus-per-task=10", "#SBATCH --time=4320", "#SBATCH --signal=USR2@120"):
        assert line in script, (line, script)
    assert "srun" in script  # every task is started by SLURM, not by a launcher of ours
