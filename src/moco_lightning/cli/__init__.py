"""Command-line entry points (``moco-train``, ``moco-eval-linear``, ...) and what they share.

Every entry point is a ``@hydra.main`` over the config tree ``conf/`` of the repository, which is installed as
the package ``moco_lightning.conf``. :data:`CONFIG_PATH` is the absolute path of that directory (from the
installed package when it is importable, else ``conf/`` next to ``src/`` in a checkout), so the entry points work
from any working directory, as scripts at the repository root and as console scripts.

Importing this module registers the OmegaConf resolvers the configs use (``${moco.one_or_many:...}``,
``${moco.cifar_stem:...}``, ``${moco.patch_size:...}``, ``${moco.wandb_offline:}``,
``${moco.cpus_per_task:...}``, ``${moco.eval_run_dir:...}``);
call :func:`register_resolvers` before composing the configs with Hydra's compose API from your own code.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import netrc
import os
import socket
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from hydra.errors import InstantiationException
from omegaconf import ListConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from moco_lightning.cli.errors import ConfigError, error_line, refused_arguments
from moco_lightning.deadline import call_with_deadline

if TYPE_CHECKING:
    import torch

    from moco_lightning.cpus import ThreadPlan

__all__ = ["CONFIG_PATH", "RUN_ERROR_FILE", "SLURM_AUTO_CPUS_PER_TASK", "config_dir", "count_devices",
           "count_processes", "register_resolvers", "report", "resolve_device", "run_or_exit", "share_cpus",
           "write_results"]

#: The file a training run that ended with an error leaves in its run folder: the error in one line. A run that
#: starts (or resumes) in the folder deletes it, and ``moco-sweep-report`` reads it to tell a failed job from one
#: still running.
RUN_ERROR_FILE = "error.txt"

#: Images of at most this many pixels a side get the CIFAR stem (3x3 stride-1 conv, no max-pool) by default, and
#: ViTs a patch of :data:`SMALL_IMAGE_PATCH` pixels instead of 16.
SMALL_IMAGE_MAX = 64
SMALL_IMAGE_PATCH = 4

#: CPUs per SLURM task (one task per GPU) that ``hydra/launcher=slurm`` asks for when ``data.num_workers=auto``:
#: 8 tasks x 8 = 64 CPUs, which the smallest common 8-GPU nodes have; the task's loader then gets 7 workers.
SLURM_AUTO_CPUS_PER_TASK = 8


def config_dir() -> Path:
    """The directory of the Hydra configs (``train.yaml`` and the group folders)."""
    try:
        spec = importlib.util.find_spec("moco_lightning.conf")
    except ModuleNotFoundError:
        spec = None
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            if (Path(location) / "train.yaml").is_file():
                return Path(location).resolve()
    checkout = Path(__file__).resolve().parents[3] / "conf"  # src/moco_lightning/cli -> repository root
    if (checkout / "train.yaml").is_file():
        return checkout
    raise FileNotFoundError(
        "cannot find the Hydra configs: neither the package moco_lightning.conf nor a conf/ folder next to src/ "
        f"({checkout}) holds train.yaml; reinstall with `pip install -e .` from the repository root"
    )


#: ``config_path`` of the ``@hydra.main`` entry points: an absolute path, valid from any working directory.
CONFIG_PATH = str(config_dir())


def count_devices(devices: Any) -> int | None:
    """The number of devices a ``Trainer(devices=...)`` value asks for; ``None`` when Lightning decides (auto, -1)."""
    if isinstance(devices, ListConfig | list | tuple):
        return len(devices)
    if isinstance(devices, str):
        text = devices.strip()
        if text in ("auto", "-1"):
            return None
        if "," in text:
            return len([part for part in text.split(",") if part.strip()])
        devices = int(text)
    if isinstance(devices, bool) or not isinstance(devices, int):
        raise ValueError(f"trainer.devices must be an int, a list of ids or 'auto', got {devices!r}")
    return None if devices == -1 else devices


def count_processes(trainer: Any) -> int | None:
    """Processes of a run: ``trainer.devices`` (auto / -1 resolved with the accelerator's count) x ``num_nodes``.

    ``None`` when the device count cannot be known before the run (``devices=auto`` on an absent accelerator);
    ``ConfigError`` when ``trainer.devices`` is not a count, a list of ids, -1 or auto.
    """
    # Lightning's CUDA queries ask NVML, not the driver: CUDA must not start in the parent of ddp_fork / ddp_notebook
    from lightning.fabric.accelerators.cuda import is_cuda_available, num_cuda_devices

    try:
        devices = count_devices(trainer.get("devices", 1))
    except ValueError:
        raise ConfigError(f"trainer.devices={trainer.get('devices')!r} must be a number of devices (1, 8), a list of "
                          "device ids ([0,1]), -1 or auto") from None
    if devices is not None and devices < 1:
        raise ConfigError(f"trainer.devices={trainer.get('devices')} must ask for at least one device")
    accelerator = str(trainer.get("accelerator", "auto"))
    if devices is None and accelerator in ("gpu", "cuda", "auto"):
        devices = num_cuda_devices() if is_cuda_available() else 1 if accelerator == "auto" else None
    elif devices is None and accelerator == "cpu":
        devices = 1
    return None if devices is None else devices * int(trainer.get("num_nodes", 1) or 1)


def _one_or_many(devices: Any, num_nodes: Any, one: Any, many: Any) -> Any:
    """``one`` for a run of one process, ``many`` for several (devices x nodes); ``one`` when it cannot be known."""
    try:
        count = count_devices(devices)
    except ValueError:
        return one  # the config checks report the bad value
    return many if (count is not None and count > 1) or int(num_nodes or 1) > 1 else one


def _cifar_stem(image_size: Any) -> bool:
    """The CIFAR stem for small images (at most :data:`SMALL_IMAGE_MAX` px), the ImageNet stem otherwise."""
    return image_size is not None and int(image_size) <= SMALL_IMAGE_MAX


def _patch_size(image_size: Any) -> int:
    """ViT patch side: 16 (ViT's and MoCo v3's) on large images, 4 on small ones (32 px CIFAR: an 8 x 8 grid)."""
    return SMALL_IMAGE_PATCH if _cifar_stem(image_size) else 16


#: ``checkpoint=`` values of the evaluations that name no file (random initialisation, raw pixels).
NO_CHECKPOINT = ("none", "null", "pixels")


def _eval_run_dir(checkpoint: Any, kind: str) -> str:
    """Run folder of an evaluation: ``<run>/eval/<kind>_<date>_<time>`` beside the checkpoint it evaluates.

    ``<run>`` is the folder of the checkpoint, or the folder above it when that is a ``checkpoints/`` folder (a
    moco-train run). Without a checkpoint file (``none``, ``pixels``, not given) or where that folder cannot be
    written (a read-only download), Hydra's default ``outputs/<date>/<time>``.
    """
    now = datetime.now()
    if checkpoint is None or str(checkpoint).strip().lower() in NO_CHECKPOINT:
        return f"outputs/{now:%Y-%m-%d}/{now:%H-%M-%S}"
    path = Path(str(checkpoint)).expanduser()
    run = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    if not os.access(run, os.W_OK):
        return f"outputs/{now:%Y-%m-%d}/{now:%H-%M-%S}"
    return str(run / "eval" / f"{kind}_{now:%Y-%m-%d_%H-%M-%S}")


def _cpus_per_task(num_workers: Any) -> int:
    """``hydra.launcher.cpus_per_task`` of the SLURM launcher from ``data.num_workers``.

    A number of workers N asks for N + 1 CPUs (the training process needs its own core); ``auto`` asks for
    :data:`SLURM_AUTO_CPUS_PER_TASK`, and ``num_workers=auto`` then gives each task's loader the CPUs of its own
    task, less one. Anything else is refused here, before a job is submitted.
    """
    if isinstance(num_workers, str) and num_workers.strip().isdigit():
        num_workers = int(num_workers)
    if isinstance(num_workers, int) and not isinstance(num_workers, bool) and num_workers >= 0:
        return num_workers + 1
    if isinstance(num_workers, str) and num_workers.strip() == "auto":
        return SLURM_AUTO_CPUS_PER_TASK
    raise ValueError(f"data.num_workers={num_workers} must be an integer >= 0 or auto; the SLURM launcher asks for "
                     "that many CPUs per task plus one (auto: "
                     f"{SLURM_AUTO_CPUS_PER_TASK}, or set hydra.launcher.cpus_per_task=N)")


def _wandb_offline() -> bool:
    """Offline unless the user chose a mode (WANDB_MODE), or is logged in and the server answers.

    Logged in means WANDB_API_KEY or a netrc entry for the server. A logged-in user whose server cannot be reached
    within a few seconds (no network on a compute node) gets offline logging and a warning, instead of a run that
    waits for wandb's connection timeout and then fails.
    """
    mode = os.environ.get("WANDB_MODE")
    if mode:
        return mode.strip().lower() in ("offline", "dryrun")
    url = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    host = url.hostname or "api.wandb.ai"
    if not os.environ.get("WANDB_API_KEY"):
        try:
            if netrc.netrc(os.environ.get("NETRC")).authenticators(host) is None:
                return True
        except (OSError, netrc.NetrcParseError):
            return True
    port = url.port or (80 if url.scheme == "http" else 443)
    if _reachable(host, port):
        return False
    logging.getLogger(__name__).warning(
        "wandb: cannot reach %s:%d (no network?): logging offline under the run folder's wandb/; upload later with "
        "`wandb sync`", host, port)
    return True


@functools.lru_cache(maxsize=8)
def _reachable(host: str, port: int, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to ``host:port`` opens within ``timeout`` seconds (DNS lookup included)."""
    def connect() -> bool:
        with socket.create_connection((host, port), timeout=timeout):
            return True

    try:
        return call_with_deadline(connect, 2 * timeout, f"connecting to {host}:{port}")
    except OSError:  # refused, unreachable, or past the deadline (TimeoutError)
        return False


def resolve_device(name: str) -> torch.device:
    """The ``device`` setting of the evaluation entry points: ``auto`` = the GPU when there is one, else the CPU."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def write_results(result: dict[str, Any], output_dir: str | None) -> None:
    """Save an entry point's result dict as ``<output_dir>/results.json`` and say where (nothing without a dir)."""
    if output_dir:
        path = Path(output_dir) / "results.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"results: {path}")


def run_or_exit(evaluate: Callable[[Any], Any], cfg: Any, errors: tuple[type[Exception], ...]) -> Any:
    """``evaluate(cfg)``; a user's error (one of ``errors``, or a value a constructor refused) exits 2 in one line."""
    try:
        return evaluate(cfg)
    except MissingMandatoryValue as err:  # a required key left at ??? (e.g. checkpoint)
        print(f"error: {err.full_key} is not set; set {err.full_key}=...", file=sys.stderr)
        sys.exit(2)
    except (*errors, InstantiationException) as err:
        if isinstance(err, InstantiationException) and not refused_arguments(err):
            raise  # a fault of a constructor, not the user's
        print(f"error: {error_line(err, cfg)}", file=sys.stderr)
        sys.exit(2)


def report(cfg: Any, result: dict[str, Any], *lines: str) -> None:
    """Print an entry point's summary ``lines`` and save ``result`` as ``<paths.output_dir>/results.json``."""
    for line in lines:
        print(line, flush=True)
    write_results(result, OmegaConf.select(cfg, "paths.output_dir"))


def share_cpus(datamodule: Any, trainer: Any, measure_busy: float = 0.25) -> ThreadPlan:
    """Size torch's intra-op threads from the CPUs this process has (:mod:`moco_lightning.cpus`); one line says so.

    Before any compute: the CPUs of the affinity mask and cgroup quota, shared by the trainer's processes on this
    machine and the loader workers (``data.num_workers``), less those other jobs keep busy at the start (one
    process only). ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` set by the user win.
    """
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    from moco_lightning.cpus import plan_threads

    workers = getattr(datamodule, "num_workers_setting", getattr(datamodule, "num_workers", 0))
    plan = plan_threads(int(getattr(trainer, "num_devices", 1) or 1), workers, measure_busy=measure_busy)
    plan.apply()
    if rank_zero_only.rank == 0:
        shared = f", {plan.share} for this process" if plan.share != plan.cpus else ""
        busy = f", {plan.busy} busy with other work" if plan.busy else ""
        threads = (f"torch threads as you set them ({plan.user_setting})" if plan.user_setting
                   else f"{plan.threads} torch thread{'s' if plan.threads != 1 else ''}")
        logging.getLogger(__name__).info(
            "CPUs: %d (%s)%s%s: %s, %d loader worker%s (data.num_workers=%s)", plan.cpus, plan.source, shared, busy,
            threads, plan.workers, "s" if plan.workers != 1 else "", workers)
    return plan


def register_resolvers() -> None:
    """Register the ``moco.*`` OmegaConf resolvers used by the configs (idempotent)."""
    for name, resolver in (
        ("moco.one_or_many", _one_or_many),
        ("moco.cifar_stem", _cifar_stem),
        ("moco.patch_size", _patch_size),
        ("moco.wandb_offline", _wandb_offline),
        ("moco.cpus_per_task", _cpus_per_task),
        ("moco.eval_run_dir", _eval_run_dir),
    ):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)


register_resolvers()
