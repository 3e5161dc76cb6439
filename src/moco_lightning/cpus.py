"""How many CPUs a training process really has, and how to share them between torch's threads and loader workers.

``os.cpu_count()`` counts the machine; a process may have fewer through its affinity mask (``taskset``, SLURM
binding, a cpuset) or a cgroup CPU quota (``limits.cpu``, ``docker --cpus``), and too many OpenMP threads for the
CPUs there are is expensive (``benchmarks/RESULTS.md``, "Threads from the CPUs a run has"). :func:`usable_cpus`
counts (mask and quota; Linux reads the cgroup files, elsewhere the mask or ``os.cpu_count()``),
:func:`auto_workers` sizes ``num_workers="auto"`` and :func:`plan_threads` the intra-op threads of a process.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

from lightning.fabric.plugins.environments import TorchElasticEnvironment

__all__ = ["ThreadPlan", "auto_workers", "cgroup_cpu_quota", "idle_cpus", "plan_threads", "slurm_task_cpus",
           "usable_cpus", "user_thread_setting"]

#: Where the cgroup file systems are mounted (v2: one unified hierarchy; v1: one folder per controller).
CGROUP_ROOT = Path("/sys/fs/cgroup")
#: The process's cgroups, one ``id:controllers:path`` line per hierarchy.
PROC_CGROUP = Path("/proc/self/cgroup")
#: Per-CPU time counters since boot, in clock ticks.
PROC_STAT = Path("/proc/stat")
#: Environment variables with which a user sets torch's intra-op threads (OpenMP's and MKL's own).
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def _affinity_cpus() -> int:
    """The CPUs of this process's affinity mask; the machine's where the platform has no masks (macOS, Windows)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _cgroup_paths(proc_cgroup: Path) -> dict[str, str]:
    """``{controller: path}`` of this process from ``/proc/self/cgroup``; the v2 hierarchy under ``""``."""
    paths: dict[str, str] = {}
    try:
        text = proc_cgroup.read_text()
    except OSError:
        return paths
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            for controller in parts[1].split(",") if parts[1] else [""]:
                paths[controller] = parts[2]
    return paths


def _folders_up(mount: Path, path: str) -> list[Path]:
    """``mount/path`` and each existing parent up to ``mount``: a quota anywhere above the process applies to it."""
    parts = [p for p in path.strip("/").split("/") if p and p != ".."]
    return [mount.joinpath(*parts[:n]) for n in range(len(parts), -1, -1)]


def _quota_v2(folder: Path) -> float | None:
    """CPUs of ``cpu.max`` (``"quota period"``, quota ``max`` = none) in ``folder``; ``None`` without a quota."""
    try:
        fields = (folder / "cpu.max").read_text().split()
    except OSError:
        return None
    if len(fields) != 2 or fields[0] == "max":
        return None
    try:
        quota, period = int(fields[0]), int(fields[1])
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def _quota_v1(folder: Path) -> float | None:
    """CPUs of ``cpu.cfs_quota_us / cpu.cfs_period_us`` in ``folder`` (quota -1 = none); ``None`` without one."""
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text().strip())
        period = int((folder / "cpu.cfs_period_us").read_text().strip())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def cgroup_cpu_quota(root: Path | None = None, proc_cgroup: Path | None = None) -> float | None:
    """The tightest CPU quota (e.g. ``1.5``) of this process's cgroups, v2 or v1, and those above; ``None`` if none."""
    root = CGROUP_ROOT if root is None else root
    paths = _cgroup_paths(PROC_CGROUP if proc_cgroup is None else proc_cgroup)
    quotas = []
    for folder in _folders_up(root, paths.get("", "/")):
        quotas.append(_quota_v2(folder))
    for mount_name in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
        mount = root / mount_name
        if mount.is_dir():
            quotas += [_quota_v1(folder) for folder in _folders_up(mount, paths.get("cpu", "/"))]
    found = [q for q in quotas if q is not None]
    return min(found) if found else None


def usable_cpus(root: Path | None = None, proc_cgroup: Path | None = None) -> tuple[int, str]:
    """The CPUs this process may use and where that number comes from (``"affinity mask"``, ``"cgroup quota"``).

    The smaller of the affinity mask and the cgroup quota, rounded up, at least 1.
    """
    mask = _affinity_cpus()
    quota = cgroup_cpu_quota(root, proc_cgroup)
    if quota is not None and math.ceil(quota) < mask:
        return max(1, math.ceil(quota)), f"cgroup quota {quota:g} CPUs"
    return mask, "affinity mask"


def slurm_task_cpus() -> int | None:
    """The CPUs of this process's own SLURM task, when SLURM started one task per training process; else ``None``.

    That is an ``srun`` job step of several tasks, which Lightning's ``SLURMEnvironment`` takes its ranks from; not an
    interactive allocation, a batch script without ``srun``, or ``torchrun``, whose processes share the CPUs.
    """
    env = os.environ
    if "SLURM_STEP_ID" not in env and "SLURM_STEPID" not in env:
        return None  # not a task started by srun
    if TorchElasticEnvironment.detect():
        return None  # torchrun started the processes, possibly several in one task
    if env.get("SLURM_JOB_NAME") in ("bash", "interactive"):
        return None  # Lightning's interactive mode: it starts the processes itself
    try:
        if int(env.get("SLURM_NTASKS", "1")) <= 1:
            return None  # one task: the processes of the machine, if several, are Lightning's own
    except ValueError:
        return None
    cores = usable_cpus()[0]
    try:
        per_task = int(env.get("SLURM_CPUS_PER_TASK", ""))
    except ValueError:
        return cores
    return max(1, min(per_task, cores))


def _process_share(processes_on_this_machine: int) -> int:
    """The CPUs of one training process: its SLURM task's, or the usable CPUs divided by the machine's processes."""
    task_cpus = slurm_task_cpus()
    if task_cpus is not None:
        return task_cpus
    return max(1, usable_cpus()[0] // max(1, processes_on_this_machine))


def auto_workers(processes_on_this_machine: int = 1) -> int:
    """``num_workers="auto"``: the CPUs of this process's share (or its SLURM task's), less one."""
    share = _process_share(processes_on_this_machine)
    return share - 1 if share > 1 else 0


def _cpu_times(text: str) -> dict[int, tuple[int, int]]:
    """``{cpu: (busy, total)}`` clock ticks from the text of ``/proc/stat`` (idle and iowait count as idle)."""
    times = {}
    for line in text.splitlines():
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu" or not name[3:].isdigit():
            continue
        ticks = [int(f) for f in fields[:8]]  # user nice system idle iowait irq softirq steal (guest is in user)
        total = sum(ticks)
        times[int(name[3:])] = (total - ticks[3] - (ticks[4] if len(ticks) > 4 else 0), total)
    return times


def idle_cpus(before: str, after: str, cpus: set[int]) -> float:
    """How many of ``cpus`` were idle between two readings of ``/proc/stat`` (a sum of idle fractions)."""
    first, second = _cpu_times(before), _cpu_times(after)
    idle = 0.0
    for cpu in cpus:
        if cpu not in first or cpu not in second:
            idle += 1.0  # not listed: nothing known against it
            continue
        busy = second[cpu][0] - first[cpu][0]
        total = second[cpu][1] - first[cpu][1]
        idle += 1.0 - busy / total if total > 0 else 1.0
    return idle


def _sample_idle_cpus(seconds: float) -> float | None:
    """Idle CPUs of this process's mask over ``seconds`` (this process sleeps meanwhile); ``None`` off Linux."""
    try:
        mask = os.sched_getaffinity(0)
        before = PROC_STAT.read_text()
        time.sleep(seconds)
        after = PROC_STAT.read_text()
    except (AttributeError, OSError):
        return None
    return idle_cpus(before, after, set(mask))


def user_thread_setting() -> str | None:
    """``"OMP_NUM_THREADS=4"`` when the user set torch's threads in the environment, else ``None``."""
    for name in THREAD_VARIABLES:
        if os.environ.get(name, "").strip():
            return f"{name}={os.environ[name].strip()}"
    return None


@dataclass(frozen=True)
class ThreadPlan:
    """The CPUs a training process has and how they are shared.

    Attributes:
        cpus: CPUs the process may use (:func:`usable_cpus`), before sharing them with other training processes.
        source: where ``cpus`` comes from: ``"affinity mask"``, ``"cgroup quota 1.5 CPUs"`` or ``"SLURM task"``.
        share: the CPUs of this process: ``cpus`` divided by the machine's training processes (or its SLURM task's).
        busy: of the share, the CPUs found busy with other work at the start (only counted for a single process).
        workers: loader worker processes, each with one thread.
        threads: torch intra-op threads of the training process; ``None`` where the user chose (``user_setting``).
        user_setting: the user's own setting (``"OMP_NUM_THREADS=1"``), which a plan never overrides.

    """

    cpus: int
    source: str
    share: int
    busy: int
    workers: int
    threads: int | None
    user_setting: str | None = None

    def apply(self) -> None:
        """``torch.set_num_threads(threads)``; nothing where the user set the threads themselves."""
        import torch

        if self.threads is not None and self.user_setting is None:
            torch.set_num_threads(self.threads)


def plan_threads(processes_on_this_machine: int = 1, workers: int | str = 0, measure_busy: float = 0.0) -> ThreadPlan:
    """Share the CPUs of this process between its torch intra-op threads and its ``workers`` loader workers.

    Each loader worker takes one CPU of the process's share (``"auto"``: :func:`auto_workers`), the threads the rest,
    at least one. With ``measure_busy`` seconds and a single training process, CPUs other jobs keep busy
    (``/proc/stat``) are taken off first (several processes of one run would count each other). An ``OMP_NUM_THREADS``
    / ``MKL_NUM_THREADS`` the user set wins: ``threads`` is then ``None``.
    """
    cpus, source = usable_cpus()
    task_cpus = slurm_task_cpus()
    if task_cpus is not None:
        source = f"SLURM task ({source} {cpus})"
    share = _process_share(processes_on_this_machine)
    n_workers = auto_workers(processes_on_this_machine) if workers == "auto" else int(workers)
    user = user_thread_setting()
    busy = 0
    if not user and measure_busy > 0 and processes_on_this_machine <= 1 and task_cpus is None:
        idle = _sample_idle_cpus(measure_busy)
        if idle is not None:
            busy = min(share - 1, max(0, share - round(idle)))
    threads = None if user else max(1, share - busy - n_workers)
    return ThreadPlan(cpus=cpus, source=source, share=share, busy=busy, workers=n_workers, threads=threads,
                      user_setting=user)
