import pytest
import torch

from moco_lightning.queue import KeyQueue, check_queue_size, queue_fit_warning


def test_queue_starts_as_random_unit_rows():
    q = KeyQueue(32, 8)
    assert q.queue.shape == (32, 8)
    torch.testing.assert_close(q.queue.norm(dim=1), torch.ones(32))
    assert int(q.ptr) == 0
    assert q.queue.std() > 0.1  # not a constant


def test_enqueue_is_fifo_and_wraps_around():
    q = KeyQueue(6, 3)
    batches = [torch.full((2, 3), float(i)) for i in range(4)]
    for b in batches[:3]:
        q.enqueue(b)
    assert int(q.ptr) == 0
    assert torch.equal(q.queue, torch.cat(batches[:3]))
    q.enqueue(batches[3])  # overwrites the oldest batch only
    assert int(q.ptr) == 2
    assert torch.equal(q.queue, torch.cat([batches[3], batches[1], batches[2]]))


def test_queue_size_must_be_multiple_of_global_batch():
    q = KeyQueue(10, 3)
    with pytest.raises(ValueError, match=r"queue_size=10 must be a multiple of the global batch size 4"):
        q.check_batch(4)
    with pytest.raises(ValueError, match="multiple of the global batch"):
        q.enqueue(torch.zeros(4, 3))
    q.check_batch(5)


def test_queue_and_pointer_are_in_state_dict():
    q = KeyQueue(4, 2)
    q.enqueue(torch.ones(2, 2))
    state = q.state_dict()
    assert set(state) == {"queue", "ptr", "written_at"}
    fresh = KeyQueue(4, 2)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.queue, q.queue) and int(fresh.ptr) == 2


def test_enqueue_stamps_each_slot_with_the_step_of_its_keys():
    q = KeyQueue(6, 3)
    assert torch.equal(q.written_at, torch.zeros(6, dtype=torch.long))  # the random keys of the start: step 0
    for step in (1, 2, 3, 4):
        q.enqueue(torch.ones(2, 3), step=step)
    assert q.written_at.tolist() == [4, 4, 2, 2, 3, 3]  # step 4 overwrote the oldest slots, those of step 1


def test_enqueue_without_a_step_counts_calls():
    q = KeyQueue(4, 2)
    for _ in range(3):
        q.enqueue(torch.ones(2, 2))
    assert q.written_at.tolist() == [3, 3, 2, 2]


def test_queue_size_check_names_the_sizes_to_use():
    with pytest.raises(ValueError, match=r"queue_size=192 must be a multiple of twice the global batch size 64 .*"
                                         r"use queue_size=128 or 256"):
        check_queue_size(192, 32, processes=2, symmetric=True)
    check_queue_size(256, 32, processes=2, symmetric=True)


def test_a_queue_as_large_as_the_training_set_gets_a_size_to_use():
    message = queue_fit_warning(4096, 64, 3000)
    assert message is not None and message.startswith("queue_size=4096 is not smaller than the training set")
    assert "use queue_size=256 " in message  # 300 rounded down to a multiple of the 64 keys per step
    assert queue_fit_warning(4096, 64, 50_000) is None


def test_enqueue_never_reads_the_pointer_back_and_follows_a_loaded_state(monkeypatch):
    source = KeyQueue(6, 3)
    source.enqueue(torch.ones(2, 3))
    q = KeyQueue(6, 3)
    q.load_state_dict(source.state_dict())  # the host-side pointer follows the checkpoint

    def no_host_read(self, *args):
        raise AssertionError("enqueue read a tensor value on the host (a host-device sync on a GPU)")

    for name in ("item", "__int__", "__index__", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, no_host_read)
    q.enqueue(torch.full((2, 3), 2.0))
    monkeypatch.undo()
    assert int(q.ptr) == 4 and torch.equal(q.queue[2:4], torch.full((2, 3), 2.0))
    assert torch.equal(q.queue[:2], torch.ones(2, 3))
