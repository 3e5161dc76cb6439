"""The CPUs a process really has (affinity mask, cgroup quota, other jobs) and how they are shared."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from moco_lightning import cpus
from moco_lightning.cpus import auto_workers, cgroup_cpu_quota, idle_cpus, plan_threads, usable_cpus


def fake_cgroups(tmp_path: Path, files: dict[str, str], proc: str) -> tuple[Path, Path]:
    """A cgroup mount ``tmp_path/cgroup`` holding ``files`` and a ``/proc/self/cgroup`` with ``proc``."""
    root = tmp_path / "cgroup"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    root.mkdir(exist_ok=True)
    proc_cgroup = tmp_path / "proc_cgroup"
    proc_cgroup.write_text(proc)
    return root, proc_cgroup


@pytest.fixture
def machine(monkeypatch, tmp_path):
    """A machine of ``cpus`` CPUs in the mask, no cgroup quota, no SLURM and no thread variables."""
    for name in list(os.environ):
        if name.startswith(("SLURM_", "TORCHELASTIC_")) or name in (*cpus.THREAD_VARIABLES, "LOCAL_WORLD_SIZE"):
            monkeypatch.delenv(name)
    root, proc = fake_cgroups(tmp_path, {}, "0::/\n")
    monkeypatch.setattr(cpus, "CGROUP_ROOT", root)
    monkeypatch.setattr(cpus, "PROC_CGROUP", proc)

    def set_cpus(count: int, quota: str | None = None) -> None:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(count)), raising=False)
        if quota is not None:
            (root / "cpu.max").write_text(quota)

    return set_cpus


def test_cgroup_v2_quota_is_read_from_cpu_max_in_cpus(tmp_path):
    root, proc = fake_cgroups(tmp_path, {"job/cpu.max": "150000 100000\n"}, "0::/job\n")
    assert cgroup_cpu_quota(root, proc) == pytest.approx(1.5, rel=1e-9)


def test_cgroup_v2_without_a_quota_is_none(tmp_path):
    root, proc = fake_cgroups(tmp_path, {"job/cpu.max": "max 100000\n"}, "0::/job\n")
    assert cgroup_cpu_quota(root, proc) is None


def test_the_tightest_quota_above_the_process_applies(tmp_path):
    root, proc = fake_cgroups(tmp_path, {"cpu.max": "max 100000", "pod/cpu.max": "200000 100000",
                                         "pod/job/cpu.max": "800000 100000"}, "0::/pod/job\n")
    assert cgroup_cpu_quota(root, proc) == pytest.approx(2.0, rel=1e-9)


def test_a_host_path_that_is_not_mounted_in_the_container_falls_back_to_the_mount(tmp_path):
    root, proc = fake_cgroups(tmp_path, {"cpu.max": "400000 100000"}, "0::/kubepods/burstable/pod123/abc\n")
    assert cgroup_cpu_quota(root, proc) == pytest.approx(4.0, rel=1e-9)


def test_cgroup_v1_quota_is_read_from_the_cpu_controller(tmp_path):
    root, proc = fake_cgroups(tmp_path, {"cpu,cpuacct/docker/x/cpu.cfs_quota_us": "250000\n",
                                         "cpu,cpuacct/docker/x/cpu.cfs_period_us": "100000\n"},
                              "4:memory:/docker/x\n3:cpu,cpuacct:/docker/x\n0::/\n")
    assert cgroup_cpu_quota(root, proc) == pytest.approx(2.5, rel=1e-9)
    (root / "cpu,cpuacct/docker/x/cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_quota(root, proc) is None


def test_usable_cpus_are_the_mask_or_the_quota_rounded_up_whichever_is_smaller(machine):
    machine(8)
    assert usable_cpus() == (8, "affinity mask")
    machine(8, "150000 100000")
    assert usable_cpus() == (2, "cgroup quota 1.5 CPUs")
    machine(2, "1600000 100000")  # a quota of 16 CPUs does not give a process bound to 2 more
    assert usable_cpus() == (2, "affinity mask")


def test_auto_workers_follow_the_quota_not_the_machine(machine):
    machine(64, "400000 100000")
    assert auto_workers(1) == 3
    assert auto_workers(2) == 1


@pytest.mark.parametrize(("cpus_", "processes", "workers", "threads"), [
    (2, 1, 0, 2),  # the digits default: no workers, both CPUs are the training process's
    (16, 1, "auto", 1),  # 15 workers and the training process
    (96, 8, "auto", 1),  # 8 GPUs: 12 CPUs each, 11 workers
    (96, 8, 4, 8),  # 12 each, 4 of them for workers
    (4, 8, 2, 1),  # fewer CPUs than processes: still one thread
])
def test_threads_are_the_process_share_less_its_workers(machine, cpus_, processes, workers, threads):
    machine(cpus_)
    plan = plan_threads(processes, workers)
    assert plan.threads == threads and plan.user_setting is None
    assert plan.workers == (max(0, cpus_ // processes - 1) if workers == "auto" else workers)


def test_the_threads_follow_a_cgroup_quota(machine):
    machine(64, "300000 100000")
    plan = plan_threads(1, 0)
    assert (plan.cpus, plan.threads) == (3, 3) and plan.source.startswith("cgroup quota")


def test_omp_num_threads_set_by_the_user_wins(machine, monkeypatch):
    machine(16)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    plan = plan_threads(1, 0, measure_busy=0.05)
    assert plan.threads is None and plan.user_setting == "OMP_NUM_THREADS=3" and plan.busy == 0
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        plan.apply()
        assert torch.get_num_threads() == 1  # untouched
    finally:
        torch.set_num_threads(before)


def test_apply_sets_torch_threads(machine):
    machine(1)
    before = torch.get_num_threads()
    try:
        plan_threads(1, 0).apply()
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


STAT_BEFORE = """cpu  300 0 100 600 0 0 0 0 0 0
cpu0 100 0 0 100 0 0 0 0 0 0
cpu1 200 0 100 500 0 0 0 0 0 0
intr 1 2 3
"""
# cpu0: 100 ticks, all busy (another job); cpu1: 100 ticks, 20 busy, 80 idle (incl. 10 iowait)
STAT_AFTER = """cpu  420 0 100 670 10 0 0 0 0 0
cpu0 200 0 0 100 0 0 0 0 0 0
cpu1 220 0 100 570 10 0 0 0 0 0
intr 1 2 3
"""


def test_idle_cpus_sum_the_idle_fractions_of_the_mask():
    assert idle_cpus(STAT_BEFORE, STAT_AFTER, {0, 1}) == pytest.approx(0.8, abs=1e-9)
    assert idle_cpus(STAT_BEFORE, STAT_AFTER, {1}) == pytest.approx(0.8, abs=1e-9)
    assert idle_cpus(STAT_BEFORE, STAT_AFTER, {0}) == pytest.approx(0.0, abs=1e-9)


def test_a_cpu_busy_with_another_job_is_left_to_it_by_a_single_process(machine, monkeypatch):
    machine(2)
    monkeypatch.setattr(cpus, "_sample_idle_cpus", lambda seconds: 1.1)  # one of the two CPUs is busy
    plan = plan_threads(1, 0, measure_busy=0.1)
    assert (plan.busy, plan.threads) == (1, 1)
    monkeypatch.setattr(cpus, "_sample_idle_cpus", lambda seconds: 0.0)  # all busy: still one thread
    assert plan_threads(1, 0, measure_busy=0.1).threads == 1
    # several processes of one run would count each other while they start: they share equally
    machine(16)
    assert plan_threads(2, 0, measure_busy=0.1).busy == 0
