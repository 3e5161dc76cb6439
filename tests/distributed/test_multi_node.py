"""The real `python train.py` as 2 nodes x 1 process on localhost (gloo), launched both ways users launch multi-node
Lightning jobs: Lightning's own variables (MASTER_ADDR / MASTER_PORT / NODE_RANK, trainer.num_nodes=2) and
``torchrun --nnodes 2 --nproc-per-node 1 --node-rank R``. The two nodes share one run folder, as on a cluster with a
shared file system: one checkpoint set and one metrics.csv (global rank 0 writes them), one queue on both nodes."""

from __future__ import annotations

import csv
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from .queue_dump import assert_one_run_on_both_ranks

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 240  # both nodes together; the pytest timeout below is larger, so the nodes are killed first

ENVIRONMENTS = {"lightning": "LightningEnvironment", "torchrun": "TorchElasticEnvironment"}  # Lightning's class
# what a launcher sets: a node must not inherit them from whoever runs the suite (LOCAL_RANK would tell Lightning
# that the processes were started externally)
LAUNCH_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "GROUP_RANK", "LOCAL_RANK", "RANK", "WORLD_SIZE",
                    "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID", "SLURM_NTASKS", "SLURM_JOB_NAME", "SLURM_JOB_ID")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _descendants(pid: int) -> list[int]:
    """The processes below ``pid`` (from /proc): torchrun starts its workers in sessions of their own."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            child, rest = stat.read_text().split(" ", 1)
            children.setdefault(int(rest.rsplit(")", 1)[1].split()[1]), []).append(int(child))
        except (OSError, ValueError, IndexError):
            continue  # ended meanwhile
    found, todo = [], [pid]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += below
    return found


def _kill(proc: subprocess.Popen) -> None:
    """Kill a node with its whole tree: its process group and whatever it started in other sessions."""
    below = _descendants(proc.pid)  # before the kill: orphans are adopted by init and lose the link
    os.killpg(proc.pid, signal.SIGKILL)
    for pid in below:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def _node_command(mode: str, node_rank: int, port: int, args: list[str]) -> tuple[list[str], dict[str, str]]:
    """The command line and the extra environment of one node."""
    train = str(REPO / "train.py")
    if mode == "lightning":
        return ([sys.executable, train, *args],
                {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "NODE_RANK": str(node_rank)})
    return ([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
             "--node-rank", str(node_rank), "--master-addr", "127.0.0.1", "--master-port", str(port), train, *args],
            {})


def _run_nodes(mode: str, args: list[str], cwd: Path) -> list[tuple[int | None, str]]:
    """Start both nodes at once; their exit statuses and outputs.

    A node that fails ends the run (the other would wait for it until gloo's timeout); at the end, and on any error
    (pytest's timeout included), what still runs is killed with its children.
    """
    base = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
    base.update(OMP_NUM_THREADS="1", WANDB_MODE="offline", PYTHONWARNINGS="ignore",
                PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    port = _free_port()
    procs, logs = [], []
    try:
        for node_rank in (0, 1):
            command, extra = _node_command(mode, node_rank, port, args)
            log = (cwd / f"node{node_rank}.log").open("w")  # a file, not a pipe: a full pipe would stall a node
            logs.append(log)
            procs.append(subprocess.Popen(command, cwd=cwd, env={**base, **extra}, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True))
        deadline = time.monotonic() + TIMEOUT
        while (statuses := [proc.poll() for proc in procs]) and not (
                all(status is not None for status in statuses) or any(status for status in statuses)):
            if time.monotonic() > deadline:
                pytest.fail(f"{mode}: the nodes did not finish within {TIMEOUT} s:\n" + "\n".join(
                    f"--- node {r}:\n{(cwd / f'node{r}.log').read_text()[-3000:]}" for r in range(len(procs))))
            time.sleep(0.2)
    finally:
        for proc in procs:
            if proc.poll() is None:
                _kill(proc)
        for log in logs:
            log.close()
    return [(status, (cwd / f"node{r}.log").read_text()) for r, status in enumerate(statuses)]


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", ["lightning", "torchrun"])
def test_train_py_on_two_nodes_writes_one_run_and_keeps_one_queue(tmp_path, mode):
    run, dumps = tmp_path / "run", tmp_path / "dumps"  # one run folder for both nodes: a shared file system
    args = ["trainer.accelerator=cpu", "trainer.devices=1", "trainer.num_nodes=2", "data.image_size=8",
            "data.batch_size=16", "model.queue_size=64", "trainer.max_epochs=1", "trainer.limit_train_batches=3",
            "knn_report=false", "trainer.log_every_n_steps=1", "callbacks.progress_bar.refresh_rate=0",
            "+callbacks.queue_dump._target_=queue_dump.QueueDump", f"+callbacks.queue_dump.path={dumps}",
            f"hydra.run.dir={run}"]
    (status0, out0), (status1, out1) = _run_nodes(mode, args, tmp_path)
    assert status0 == 0 and status1 == 0, f"node 0 ({status0}):\n{out0[-3000:]}\nnode 1 ({status1}):\n{out1[-3000:]}"
    # the recipe, said once (by global rank 0): the key batch shuffled over the 2 processes of the 2 nodes
    assert "MoCo BN mode: shuffle (bn=shuffle, 2 process(es))" in out0

    r0, r1 = assert_one_run_on_both_ranks(dumps)
    # really two nodes, with the cluster environment of the launch mode
    assert r0["num_nodes"] == r1["num_nodes"] == 2 and (r0["node_rank"], r1["node_rank"]) == (0, 1)
    assert r0["cluster_environment"] == r1["cluster_environment"] == ENVIRONMENTS[mode]

    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert "last.ckpt" in checkpoints and len([c for c in checkpoints if c != "last.ckpt"]) == 1, checkpoints
    # the checkpoint holds the queue both nodes ended with
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    assert torch.equal(state["key_queue.queue"], r0["queue"]) and int(state["key_queue.ptr"]) == 32
    metrics = list(run.rglob("metrics.csv"))
    assert len(metrics) == 1  # global rank 0 logs; node 1 does not write a second run
    assert any(row.get("val/knn_top1") for row in csv.DictReader(metrics[0].open()))  # the kNN monitor ran
