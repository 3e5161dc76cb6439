import os
from types import SimpleNamespace

import pytest
import torch

from moco_lightning import cpus as cpus_module
from moco_lightning.data import DigitsDataModule
from moco_lightning.data.base import auto_workers, seed_worker, slurm_task_cpus


def first_batches(dm, n=2):
    """The first ``n`` pretraining batches as the model sees them (batch augmentation applied when it is on)."""
    it = iter(dm.train_dataloader())
    batches = [next(it) for _ in range(n)]
    return [dm.augment_batch(b) for b in batches] if dm.batch_augmentation else batches


def assert_same(a, b):
    for ((q1, k1), y1), ((q2, k2), y2) in zip(a, b, strict=True):
        assert torch.equal(q1, q2) and torch.equal(k1, k2) and torch.equal(y1, y2)


def test_loader_settings_are_passed_to_the_dataloader():
    dm = DigitsDataModule(batch_size=8, num_workers=2, pin_memory=False, persistent_workers=True,
                          prefetch_factor=3, eval_batch_size=50)
    loader = dm.train_dataloader()
    assert loader.batch_size == 8 and loader.num_workers == 2 and loader.pin_memory is False
    assert loader.persistent_workers is True and loader.prefetch_factor == 3 and loader.drop_last
    assert dm.eval_val_dataloader().batch_size == 50


def test_every_loader_seeds_its_own_workers():
    # so Lightning's worker seeding (seed_everything(workers=True)) would never apply: the CLIs do not ask for it
    dm = DigitsDataModule(batch_size=8, num_workers=2)
    loaders = [dm.train_dataloader(), dm.eval_train_dataloader(), dm.eval_val_dataloader()]
    assert all(loader.worker_init_fn is seed_worker for loader in loaders)


def test_persistent_workers_default_follows_num_workers():
    assert DigitsDataModule(num_workers=0).persistent_workers is False
    assert DigitsDataModule(num_workers=2).persistent_workers is True


def test_same_seed_same_batches_in_the_main_process():
    torch.manual_seed(123)
    a = first_batches(DigitsDataModule(batch_size=16, seed=7))
    torch.manual_seed(123)
    b = first_batches(DigitsDataModule(batch_size=16, seed=7))
    assert_same(a, b)


def test_shuffle_order_follows_the_datamodule_seed():
    torch.manual_seed(0)
    (_, y1), = first_batches(DigitsDataModule(batch_size=64, seed=1), 1)
    torch.manual_seed(0)
    (_, y2), = first_batches(DigitsDataModule(batch_size=64, seed=2), 1)
    assert not torch.equal(y1, y2)


@pytest.mark.timeout(120)
def test_same_seed_same_batches_with_workers_whatever_the_global_rng():
    torch.manual_seed(1)
    a = first_batches(DigitsDataModule(batch_size=16, seed=7, num_workers=1, persistent_workers=False))
    torch.manual_seed(2)
    b = first_batches(DigitsDataModule(batch_size=16, seed=7, num_workers=1, persistent_workers=False))
    assert_same(a, b)
    torch.manual_seed(1)
    c = first_batches(DigitsDataModule(batch_size=16, seed=8, num_workers=1, persistent_workers=False))
    assert not torch.equal(a[0][0][0], c[0][0][0])


def test_the_evaluation_view_is_computed_once_and_the_augmented_one_every_time(monkeypatch):
    from moco_lightning.data.base import TransformedDataset

    dm = DigitsDataModule(batch_size=8, num_workers=0, image_size=8)
    calls = {"eval": 0}
    transform = dm.eval_transform

    def counting(image):
        calls["eval"] += 1
        return transform(image)

    monkeypatch.setattr(DigitsDataModule, "eval_transform", property(lambda self: counting))
    val = dm.eval_dataset("val")
    first = [x for x, _ in val]
    again = [x for x, _ in val]
    assert calls["eval"] == len(val) and all(torch.equal(a, b) for a, b in zip(first, again))
    augmented = dm.eval_dataset("train", augment=True)
    assert not augmented.cache  # the linear probe's random view must be drawn anew
    monkeypatch.setattr(TransformedDataset, "CACHE_BYTES", 100)  # a set larger than the limit: no cache
    big = TransformedDataset(val.base, transform, cache=True)
    big[0], big[0]
    assert not big.cache and not big._items


# ---------------------------------------------------------------------------------------------- pin_memory
def cuda_must_not_be_asked(monkeypatch):
    """Make the calls that initialise CUDA in this process fail, as ddp_fork / ddp_notebook would later."""
    def initialises_cuda(*args, **kwargs):
        raise AssertionError("initialises CUDA")

    monkeypatch.setattr(torch.cuda, "is_available", initialises_cuda)
    monkeypatch.setattr(torch.cuda, "device_count", initialises_cuda)


def all_loaders(dm):
    return [dm.train_dataloader(), dm.eval_train_dataloader(), dm.eval_val_dataloader()]


def test_the_default_pin_memory_does_not_initialise_cuda_and_pins_nothing_without_a_gpu(monkeypatch):
    cuda_must_not_be_asked(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)  # this process has not used CUDA
    dm = DigitsDataModule(batch_size=16, image_size=8)
    assert not any(loader.pin_memory for loader in all_loaders(dm))
    assert all(loader.pin_memory for loader in all_loaders(DigitsDataModule(batch_size=16, pin_memory=True)))


def test_the_default_pin_memory_follows_the_trainers_device(monkeypatch):
    import lightning as L

    cpu_trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False)
    cuda_must_not_be_asked(monkeypatch)
    dm = DigitsDataModule(batch_size=16, image_size=8)
    dm.trainer = cpu_trainer
    assert not any(loader.pin_memory for loader in all_loaders(dm))
    # a trainer on a GPU (faked: its strategy's root device is all the datamodule reads)
    dm.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cuda", 0)), global_rank=0,
                                 world_size=1, num_devices=1, training=False)
    assert all(loader.pin_memory for loader in all_loaders(dm))
    dm.pin_memory = False  # the user's setting wins
    assert not any(loader.pin_memory for loader in all_loaders(dm))


# ---------------------------------------------------------------------------------------------- auto workers
SLURM_TASK = {"SLURM_JOB_NAME": "train", "SLURM_NTASKS": "16", "SLURM_NTASKS_PER_NODE": "8", "SLURM_STEP_ID": "0",
              "SLURM_PROCID": "3", "SLURM_LOCALID": "3", "SLURM_NODEID": "0"}


def slurm_env(monkeypatch, cpus, **env):
    """No SLURM or torchrun variables but ``env``, and a process that may use ``cpus`` cores."""
    for name in list(os.environ):
        if name.startswith(("SLURM_", "TORCHELASTIC_")) or name in ("RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)), raising=False)
    monkeypatch.setattr(cpus_module, "cgroup_cpu_quota", lambda *args: None)  # the test machine's own quota aside


def test_auto_workers_of_a_slurm_task_are_its_own_cpus_less_one(monkeypatch):
    # srun bound each of the 8 tasks of the node to its 10 CPUs: all of them are this process's
    slurm_env(monkeypatch, 10, **SLURM_TASK, SLURM_CPUS_PER_TASK="10")
    assert auto_workers(8) == 9 and slurm_task_cpus() == 10
    # no CPU binding: the process sees the node's CPUs, its task's share is SLURM_CPUS_PER_TASK
    slurm_env(monkeypatch, 128, **SLURM_TASK, SLURM_CPUS_PER_TASK="10")
    assert auto_workers(8) == 9
    # no --cpus-per-task: the CPUs the task is bound to, as they are
    slurm_env(monkeypatch, 6, **SLURM_TASK)
    assert auto_workers(8) == 5
    slurm_env(monkeypatch, 1, **SLURM_TASK, SLURM_CPUS_PER_TASK="1")
    assert auto_workers(8) == 0
    dm = DigitsDataModule(num_workers="auto")
    dm.trainer = SimpleNamespace(num_devices=8)
    slurm_env(monkeypatch, 10, **SLURM_TASK, SLURM_CPUS_PER_TASK="10")
    assert dm.num_workers == 9


@pytest.mark.parametrize("env", [
    {},  # no SLURM
    {"SLURM_JOB_NAME": "train", "SLURM_NTASKS": "1", "SLURM_CPUS_PER_TASK": "80"},  # the batch script, no srun
    {**SLURM_TASK, "SLURM_JOB_NAME": "interactive", "SLURM_CPUS_PER_TASK": "80"},  # Lightning's interactive mode
    {**SLURM_TASK, "SLURM_JOB_NAME": "bash", "SLURM_CPUS_PER_TASK": "80"},
    {**SLURM_TASK, "SLURM_NTASKS": "1", "SLURM_CPUS_PER_TASK": "80"},  # srun of one task: Lightning starts 8
    {**SLURM_TASK, "SLURM_NTASKS": "2", "SLURM_CPUS_PER_TASK": "80", "TORCHELASTIC_RUN_ID": "none", "RANK": "3",
     "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "8"},  # torchrun in each of 2 SLURM tasks: its 8 processes share one
], ids=["no-slurm", "batch-script", "interactive", "bash", "one-task", "torchrun"])
def test_auto_workers_share_the_cpus_when_the_processes_are_not_slurm_tasks(monkeypatch, env):
    slurm_env(monkeypatch, 80, **env)
    assert slurm_task_cpus() is None
    assert auto_workers(8) == 9  # 80 CPUs / 8 processes - 1


def test_loaders_built_before_a_trainer_pin_for_the_device_the_evaluation_names():
    from moco_lightning.data import DigitsDataModule

    datamodule = DigitsDataModule(image_size=8, num_workers=0)
    datamodule.setup("fit")
    assert not datamodule.eval_val_dataloader().pin_memory  # no trainer, no CUDA in use
    datamodule.batches_device = torch.device("cuda", 0)  # what linear_eval / fine-tuning set from their trainer
    assert datamodule.eval_val_dataloader().pin_memory
    datamodule.pin_memory = False  # the setting wins
    assert not datamodule.eval_val_dataloader().pin_memory
