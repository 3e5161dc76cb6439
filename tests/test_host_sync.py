"""The batch augmentation and the training steps never wait on the host: no blocking copy, no read-back.

There is no GPU here, so the device is emulated: :class:`EmulatedCuda` is a dispatch mode under which tensors on
``"cuda"`` are wrappers (:class:`OnDevice`) that report ``device == cuda:0`` and compute on a real CPU tensor inside.
Host tensors stay ordinary CPU tensors with real values, so the code's host-side work (parameter draws, Python
control flow on host values) runs as it does on a GPU machine. The mode records every operation that on a real
GPU would make the host wait for the device or copy between the two:

* a copy from a device tensor to the host (``.cpu()``, ``.tolist()``, ``.numpy()``) or a read-back (``.item()``,
  ``int()``, ``bool()``, ``if tensor:``: ``aten._local_scalar_dense`` / ``is_nonzero``);
* an operation whose output size depends on device values (``nonzero``, ``masked_select``, ``unique``, ...);
* a copy from the host to the device that is not ``non_blocking`` from pinned memory (``torch.tensor(...,
  device=cuda)``, ``x.to("cuda")`` of pageable memory: the host waits for the queue), and a host tensor used by a
  device operation (``rows[:, [4, 6]]``: the list becomes a host index tensor that is copied in blocking).

What is covered: the v1, v2 and v3 batch augmentations (crop on the device and crops from the loader), MoCo's step
(queries, shuffled keys with split BN, InfoNCE against the queue, enqueue, the logged accuracies and similarities)
and MoCoV3's step (both directions, the symmetric loss, the logged accuracy), and the momentum (EMA) update of
both. Not covered on the emulated device: the backward pass, because torch's autograd engine needs a real CUDA
context for CUDA tensors; the backward runs on the CPU instead under a recorder of read-backs, which is all a
backward can do to the host (its kernels are autograd's own). Lightning's logging is not covered (it is
Lightning's): the steps are driven through their own methods, without a Trainer.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
from torch.utils._python_dispatch import TorchDispatchMode, return_and_correct_aliasing
from torch.utils._pytree import tree_flatten, tree_map

from moco_lightning import MoCo, MoCoV3
from moco_lightning.data.batch_augment import build_batch_augmentation
from moco_lightning.losses import batch_positive_accuracy, positive_rank_accuracy

aten = torch.ops.aten
CUDA = torch.device("cuda", 0)
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
#: operations whose output size is a device value: the host waits to allocate it.
SIZE_FROM_VALUES = {aten.nonzero.default, aten.masked_select.default, aten.unique_consecutive.default,
                    aten._unique2.default, aten.unique_dim.default, aten.repeat_interleave.Tensor,
                    aten.nonzero_static.default}
#: read a device value into a host scalar.
READ_BACK = {aten._local_scalar_dense.default, aten.is_nonzero.default, aten.equal.default}


class OnDevice(torch.Tensor):
    """A tensor on the emulated device: reports ``cuda:0``, holds its values in a CPU tensor ``inner``."""

    inner: torch.Tensor

    @staticmethod
    def __new__(cls, inner: torch.Tensor) -> OnDevice:  # noqa: D102
        # the C++ side sees a meta tensor (no CUDA guard, no CUDA context), Python code sees ``device``: cuda:0
        out = torch.Tensor._make_wrapper_subclass(
            cls, inner.shape, strides=inner.stride(), storage_offset=inner.storage_offset(), dtype=inner.dtype,
            layout=inner.layout, device="meta", requires_grad=inner.requires_grad)
        out.inner = inner
        return out

    @property
    def device(self) -> torch.device:  # type: ignore[override]  # noqa: D102
        return CUDA

    @property
    def is_cuda(self) -> bool:  # type: ignore[override]  # noqa: D102
        return True

    def __repr__(self, *, tensor_contents: Any = None) -> str:  # no read-back when a failing test prints one
        return f"OnDevice(shape={tuple(self.shape)}, dtype={self.dtype})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN206, D105
        raise RuntimeError("an emulated device tensor was used outside EmulatedCuda")


def _where() -> str:
    """The innermost frame of the project (or of kornia) that called the operation: ``file:line``."""
    for frame in reversed(traceback.extract_stack()[:-3]):
        ours = "moco_lightning" in frame.filename or "kornia" in frame.filename
        if ours and "test_host_sync" not in frame.filename:
            return f"{frame.filename.split('site-packages/')[-1].split('src/')[-1]}:{frame.lineno}"
    return "?"


def _is_cuda(device: Any) -> bool:
    # "meta": what torch's C++ side sees of an OnDevice tensor, and passes on to the tensors it makes next to one
    return device is not None and torch.device(device).type in ("cuda", "meta")


class EmulatedCuda(TorchDispatchMode):
    """Tensors on ``"cuda"`` become :class:`OnDevice`; every host wait and blocking copy is appended to ``syncs``."""

    def __init__(self) -> None:
        super().__init__()
        self.syncs: list[str] = []
        self.recording = True

    def flag(self, what: str) -> None:
        if self.recording:
            self.syncs.append(f"{what} at {_where()}")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN206, D105
        with unset_fake_temporarily():  # the fake mode underneath is only there to keep CUDA uninitialised
            return self._dispatch(func, args, dict(kwargs or {}))

    def _dispatch(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        flat, _ = tree_flatten((args, kwargs))
        on_device = [t for t in flat if isinstance(t, OnDevice)]
        on_host = [t for t in flat if isinstance(t, torch.Tensor) and not isinstance(t, OnDevice)]
        to_device = _is_cuda(kwargs.get("device"))
        name = func.__name__ if hasattr(func, "__name__") else str(func)

        if func in (aten.is_pinned.default,):
            return bool(getattr(args[0], "_emulated_pinned", False))
        if func is aten._pin_memory.default:
            pinned = args[0].clone()
            pinned._emulated_pinned = True
            return pinned
        if func in READ_BACK and on_device:
            self.flag(f"read-back {name} of a device tensor")
        if func in SIZE_FROM_VALUES and on_device:
            self.flag(f"{name}: output size from device values")
        if func is aten._to_copy.default:
            source_on_device = isinstance(args[0], OnDevice)
            target = kwargs.get("device")
            target_on_device = source_on_device if target is None else _is_cuda(target)
            if source_on_device and not target_on_device:
                self.flag("device-to-host copy")
            if not source_on_device and target_on_device:
                if not (kwargs.get("non_blocking") and getattr(args[0], "_emulated_pinned", False)):
                    self.flag("blocking host-to-device copy (pageable memory or not non_blocking)")
            to_device = target_on_device
        elif func in (aten.copy_.default,):
            dst, src = args[0], args[1]
            if isinstance(dst, OnDevice) != isinstance(src, OnDevice):
                if isinstance(src, OnDevice) or src.dim() > 0:  # a 0-d host tensor is a kernel argument
                    self.flag("copy_ between host and device")
        elif on_device and any(t.dim() > 0 for t in on_host):
            self.flag(f"{name} takes a host tensor next to device tensors (blocking host-to-device copy)")
        elif on_device and name.startswith("index") and on_host:
            self.flag(f"{name} with a host index (blocking host-to-device copy)")

        def unwrap(x: Any) -> Any:
            if isinstance(x, OnDevice):
                return x.inner
            if isinstance(x, torch.device) and _is_cuda(x):
                return torch.device("cpu")
            return x

        uargs, ukwargs = tree_map(unwrap, args), tree_map(unwrap, kwargs)
        if "device" in ukwargs and _is_cuda(kwargs.get("device")):
            ukwargs["device"] = torch.device("cpu")
        ukwargs.pop("pin_memory", None)
        out = func(*uargs, **ukwargs)
        if func is aten._to_copy.default and not to_device:
            return out
        if func in READ_BACK or func is aten.is_pinned.default:
            return out
        if on_device or to_device:
            wrapped = tree_map(lambda x: OnDevice(x) if isinstance(x, torch.Tensor) else x, out)
            return return_and_correct_aliasing(func, args, kwargs, wrapped)
        return out


def cuda_copy(tensor: torch.Tensor) -> OnDevice:
    """A host tensor's values on the emulated device (set-up, not recorded)."""
    return OnDevice(tensor.detach().clone())


def to_emulated_device(module: torch.nn.Module) -> torch.nn.Module:
    """Move a module's parameters and buffers onto the emulated device (set-up, not recorded)."""
    return module._apply(cuda_copy)


def model_and_inputs_on_device(mode: EmulatedCuda, model: torch.nn.Module,
                               *inputs: torch.Tensor) -> list[OnDevice]:
    """Move ``model`` and copies of ``inputs`` onto the emulated device with recording off; record from then on."""
    mode.recording = False
    to_emulated_device(model)
    copies = [cuda_copy(x) for x in inputs]
    mode.recording = True
    return copies


def on_host(tensor: torch.Tensor) -> torch.Tensor:
    """The values of an emulated device tensor, as a CPU tensor (for comparisons after the fact)."""
    return tensor.inner if isinstance(tensor, OnDevice) else tensor


def record(fn: Callable[[EmulatedCuda], Any]) -> tuple[Any, list[str]]:
    """Run ``fn(mode)`` under the emulated device; return its result and the host waits it caused.

    A ``FakeTensorMode`` underneath, which never sees an operation (the emulation computes everything with it
    switched off), only tells torch's Python bindings not to initialise CUDA for ``device="cuda"``.
    """
    with FakeTensorMode(allow_non_fake_inputs=True), EmulatedCuda() as mode:
        out = fn(mode)
    return out, mode.syncs


# ---------------------------------------------------------------------------------------------- the harness
def test_the_emulated_device_catches_each_kind_of_host_wait():
    x_host = torch.arange(6.0).view(2, 3)

    def run(mode: EmulatedCuda) -> None:
        x = cuda_copy(x_host)
        x[:, [0, 2]]  # a Python list as an index: a host tensor copied in blocking
        x.sum().item()  # read-back
        bool((x > 0).any())  # read-back
        x.nonzero()  # output size from device values
        torch.tensor([1.0, 2.0], device="cuda")  # pageable copy
        x.cpu()  # device to host
        x + torch.ones(3)  # a host tensor next to a device one

    _, syncs = record(run)
    assert len(syncs) == 7, syncs
    for what in ("index", "read-back", "nonzero", "blocking host-to-device", "device-to-host", "add"):
        assert any(what in s for s in syncs), (what, syncs)


def test_the_emulated_device_lets_pinned_non_blocking_copies_and_device_math_through():
    def run(mode: EmulatedCuda) -> torch.Tensor:
        params = torch.rand(4, dtype=torch.float64).pin_memory().to("cuda", non_blocking=True)
        x = torch.zeros(4, device="cuda") + 2.0
        return (x * params.float()).clamp(max=torch.tensor(1.0))  # a 0-d host scalar is a kernel argument

    out, syncs = record(run)
    assert syncs == []
    assert isinstance(out, OnDevice) and out.device == CUDA
    assert torch.all(on_host(out) <= 1.0)


# ---------------------------------------------------------------------------------------------- augmentation
@pytest.mark.parametrize(("recipe", "crop_on_device"), [("v1", True), ("v2", True), ("v3", True), ("digits", True),
                                                      ("v2", False), ("v3", False)])
def test_batch_augmentation_never_waits_on_the_host(recipe, crop_on_device):
    augment = build_batch_augmentation(recipe, 8, MEAN, STD, crop_on_device=crop_on_device)
    images = torch.randint(0, 256, (8, 3, 12 if crop_on_device else 8, 12 if crop_on_device else 8),
                           dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    batch = images if crop_on_device else [images, images.flip(0)]

    def run(mode: EmulatedCuda) -> list[torch.Tensor]:
        on_device = cuda_copy(batch) if crop_on_device else [cuda_copy(b) for b in batch]
        outs = []
        for seed in range(3):  # several draws, so that every operation is drawn by some images and not by others
            outs += augment(on_device, torch.Generator().manual_seed(seed))
        return outs

    views, syncs = record(run)
    assert syncs == [], "\n".join(syncs)
    reference = []
    for seed in range(3):
        reference += augment(batch, torch.Generator().manual_seed(seed))
    for view, expected in zip(views, reference, strict=True):
        assert view.device == CUDA
        # the same draws, the same values; the blur's CPU kernel (the reference) sums in another order
        torch.testing.assert_close(on_host(view), expected, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------- training steps
def _backward_reads_nothing_back(loss: torch.Tensor) -> None:
    class ReadBacks(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.seen: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN206
            if func in READ_BACK or func in SIZE_FROM_VALUES:
                self.seen.append(f"{func} at {_where()}")
            return func(*args, **(kwargs or {}))

    with ReadBacks() as mode:
        loss.backward()
    assert mode.seen == [], mode.seen


def test_moco_step_never_waits_on_the_host():
    torch.manual_seed(0)
    model = MoCo("resnet18", cifar_stem=True, dim=8, queue_size=16, momentum=0.9, temperature=0.2, mlp=True,
                 bn="split", bn_splits=2)
    model.configure_bn(1)
    x_q, x_k = torch.rand(2, 4, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    queue_before = model.queue.clone()

    def run(mode: EmulatedCuda) -> dict[str, torch.Tensor]:
        im_q, im_k = model_and_inputs_on_device(mode, model, x_q, x_k)
        out = model.step(im_q, im_k)
        top1, top5 = positive_rank_accuracy(out["logits"].detach(), (1, 5))
        out["logged"] = torch.stack([top1, top5, out["logits"][:, 0].mean().detach(),
                                     out["logits"][:, 1:].mean().detach()])
        model.momentum_update(0.9)
        return out

    out, syncs = record(run)
    assert syncs == [], "\n".join(syncs)
    assert out["loss"].device == CUDA and model.queue.device == CUDA
    assert torch.isfinite(on_host(out["loss"]))
    assert not torch.equal(on_host(model.queue)[:4], queue_before[:4])  # this step's keys in the first rows
    torch.testing.assert_close(on_host(model.queue)[4:], queue_before[4:], rtol=0, atol=0)
    assert model.key_queue._ptr_host == 4


def test_moco_v3_step_never_waits_on_the_host():
    torch.manual_seed(0)
    model = MoCoV3("resnet18", cifar_stem=True, dim=8, mlp_dim=16, temperature=0.2, momentum=0.9, bn="none")
    x1, x2 = torch.rand(2, 4, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for p in model.base_encoder.parameters():
            p.add_(0.01)  # the two encoders differ, so that the momentum update moves something
    momentum_before = [p.detach().clone() for p in model.momentum_encoder.parameters()]

    def run(mode: EmulatedCuda) -> dict[str, torch.Tensor]:
        a, b = model_and_inputs_on_device(mode, model, x1, x2)
        out = model.step(a, b)
        out["acc"] = batch_positive_accuracy(out["q1"].detach(), out["k2"])
        model.momentum_update(0.9)
        return out

    out, syncs = record(run)
    assert syncs == [], "\n".join(syncs)
    assert out["loss"].device == CUDA and torch.isfinite(on_host(out["loss"]))
    for p, base, before in zip(model.momentum_encoder.parameters(), model.base_encoder.parameters(),
                               momentum_before, strict=True):
        torch.testing.assert_close(on_host(p), 0.9 * before + 0.1 * on_host(base).detach())


@pytest.mark.parametrize("v3", [False, True])
def test_the_backward_of_a_step_reads_nothing_back(v3):
    torch.manual_seed(0)
    x1, x2 = torch.rand(2, 4, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    if v3:
        model = MoCoV3("resnet18", cifar_stem=True, dim=8, mlp_dim=16, temperature=0.2, bn="none")
    else:
        model = MoCo("resnet18", cifar_stem=True, dim=8, queue_size=16, mlp=True, bn="split", bn_splits=2)
        model.configure_bn(1)
    loss = model.step(x1, x2)["loss"]
    _backward_reads_nothing_back(loss)
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
