import pytest
import torch

from moco_lightning.data import DigitsDataModule
from moco_lightning.data.base import seed_worker


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
