"""`hydra/launcher=slurm` composes to what Hydra's submitit launcher and submitit's sbatch writer expect."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf.errors import InterpolationResolutionError

from moco_lightning.cli import SLURM_AUTO_CPUS_PER_TASK

from .conftest import REPO, TRAIN_PY

pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="the submitit launcher is an optional extra")

MULTI_NODE = ["hydra/launcher=slurm", "trainer.num_nodes=2", "trainer.devices=8", "trainer.accelerator=gpu",
              "data.num_workers=10"]


def test_slurm_launcher_takes_nodes_tasks_and_gpus_from_the_trainer(compose_train):
    cfg = compose_train(MULTI_NODE, return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    # CPUs per task: the 10 loader workers and the training process itself
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node, launcher.cpus_per_task) == (2, 8, 8, 11)
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
                 "#SBATCH --cpus-per-task=11", "#SBATCH --time=4320", "#SBATCH --signal=USR2@120"):
        assert line in script, (line, script)
    assert "srun" in script  # every task is started by SLURM, not by a launcher of ours


def documented_slurm_command() -> list[str]:
    """The arguments of docs/scaling.md's ``python train.py -m hydra/launcher=slurm experiment=...`` command."""
    text = (REPO / "docs" / "scaling.md").read_text().replace("\\\n", " ")
    prefix = "python train.py -m hydra/launcher=slurm experiment="
    [line] = [line for line in text.splitlines() if line.startswith(prefix)]
    return shlex.split(line.replace("<partition>", "PARTITION"))[2:]


#: What the fake job's first task "returns": submitit raises it as the job's error, without waiting for output.
FAKE_JOB_ERROR = "fake SLURM: job 4242 did not run"

FAKE_SBATCH = """\
import pathlib, pickle, shutil, sys

record, error, args = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
script = pathlib.Path(args[-1])
(record / "sbatch_args").write_text(" ".join(args))
shutil.copy(script, record / "sbatch_script.sh")
job = script.parent / "4242"  # submitit's folder of job 4242 (.submitit/%j), its result of task 0 (%j_%t_result.pkl)
job.mkdir(exist_ok=True)
(job / "4242_0_result.pkl").write_bytes(pickle.dumps(("error", error)))
print("Submitted batch job 4242")
"""


def fake_slurm(folder: Path, record: Path) -> None:
    """SLURM's commands in ``folder``, enough for submitit to submit a job and see it end at once.

    ``sbatch`` keeps its arguments and script in ``record`` and answers job 4242, whose first task "returns"
    :data:`FAKE_JOB_ERROR`; ``sacct`` says 4242 failed; ``srun``, ``scancel`` and ``squeue`` do nothing.
    """
    folder.mkdir()
    (folder / "fake_sbatch.py").write_text(FAKE_SBATCH)
    sbatch = shlex.join([sys.executable, str(folder / "fake_sbatch.py"), str(record), FAKE_JOB_ERROR])
    scripts = {
        "sbatch": f'#!/bin/sh\nexec {sbatch} "$@"\n',
        "sacct": '#!/bin/sh\necho "JobID|State|NodeList"\necho "4242|FAILED|node1"\n',
        "srun": "#!/bin/sh\nexit 0\n",
        "scancel": "#!/bin/sh\nexit 0\n",
        "squeue": "#!/bin/sh\nexit 0\n",
    }
    for name, text in scripts.items():
        (folder / name).write_text(text)
        (folder / name).chmod(0o755)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_the_documented_slurm_command_submits_two_nodes_of_eight_gpu_tasks(tmp_path):
    bin_dir, record, data_dir = tmp_path / "bin", tmp_path / "record", tmp_path / "imagenet"
    record.mkdir()
    (data_dir / "train").mkdir(parents=True)
    (data_dir / "val").mkdir()
    fake_slurm(bin_dir, record)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}  # not a job of a real cluster
    env.update(PATH=os.pathsep.join([str(bin_dir), env.get("PATH", "")]), OMP_NUM_THREADS="1",
               WANDB_MODE="offline", PYTHONWARNINGS="ignore")
    args = documented_slurm_command()
    assert "data.data_dir=/datasets/imagenet" in args and "hydra.launcher.partition=PARTITION" in args
    args = [f"data.data_dir={data_dir}" if arg.startswith("data.data_dir=") else arg for arg in args]
    proc = subprocess.run([sys.executable, str(TRAIN_PY), *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=200)
    output = proc.stdout + proc.stderr
    assert (record / "sbatch_script.sh").is_file(), f"sbatch was never called:\n{output[-3000:]}"
    script = (record / "sbatch_script.sh").read_text()
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=PARTITION", "#SBATCH --signal=USR2@120"):
        assert line in script.splitlines(), (line, script)
    [cpus] = re.findall(r"^#SBATCH --cpus-per-task=(\d+)$", script, re.MULTILINE)
    assert int(cpus) > 0, script
    [srun] = [line for line in script.splitlines() if line.startswith("srun ")]
    assert "-m submitit.core._submit" in srun, srun  # every task is started by srun, not by a launcher of ours
    [submitted] = (record / "sbatch_args").read_text().split()  # sbatch <script>: nothing else on the line
    assert submitted.endswith(".sh")
    assert FAKE_JOB_ERROR in output, output[-3000:]  # the launcher waited for the job and got its (fake) end


@pytest.mark.parametrize(("workers", "cpus"), [("auto", SLURM_AUTO_CPUS_PER_TASK), ("0", 1), ("10", 11)])
def test_cpus_per_task_are_the_loader_workers_and_the_training_process(compose_train, workers, cpus):
    cfg = compose_train(["hydra/launcher=slurm", "experiment=imagenet_mocov2", f"data.num_workers={workers}"],
                        return_hydra_config=True)
    assert cfg.hydra.launcher.cpus_per_task == cpus
    cfg = compose_train(["hydra/launcher=slurm", "hydra.launcher.cpus_per_task=16"], return_hydra_config=True)
    assert cfg.hydra.launcher.cpus_per_task == 16  # a node with more cores: the user's number


def test_a_bad_worker_count_stops_before_anything_is_submitted(compose_train):
    cfg = compose_train(["hydra/launcher=slurm", "data.num_workers=many"], return_hydra_config=True)
    with pytest.raises(InterpolationResolutionError, match=r"data.num_workers=many must be an integer >= 0 or auto"):
        _ = cfg.hydra.launcher.cpus_per_task
