"""The speed options of the module: mixed precision, channels-last, torch.compile; and a step free of host syncs."""

from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from moco_lightning import MoCo
from moco_lightning.data.batch_augment import build_batch_augmentation
from moco_lightning.scalars import device_scalar

SIZE = 8
pytestmark = pytest.mark.filterwarnings("ignore:queue_size=8 is not smaller than the training set")


class TwoViews(Dataset):
    """Eight random images in two views, enough for two steps of batch 4."""

    def __init__(self) -> None:
        self.images = torch.rand(8, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        return (self.images[i], self.images[i].flip(-1)), i % 2


def small_moco(**kwargs) -> MoCo:
    torch.manual_seed(0)
    defaults = dict(backbone="resnet18", cifar_stem=True, dim=8, queue_size=8, momentum=0.9, temperature=0.2,
                    lr=0.05, lr_schedule="constant", bn_splits=2)  # auto BN: split, 2 groups of 2
    return MoCo(**{**defaults, **kwargs})


def fit(model: MoCo, tmp_path, steps: int = 2, **trainer_kwargs) -> MoCo:
    torch.manual_seed(0)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        **trainer_kwargs)
    trainer.fit(model, DataLoader(TwoViews(), batch_size=4, drop_last=True))
    return model


@pytest.mark.timeout(120)
def test_bf16_mixed_trains_with_a_float32_queue_and_float32_logits(tmp_path):
    model = small_moco()
    before = [p.detach().clone() for p in model.encoder_q.parameters()]
    seen: dict[str, torch.dtype] = {}
    encode_query, contrastive_loss = model.encode_query, model.contrastive_loss

    def spy_query(im_q):
        features, q = encode_query(im_q)
        seen["features"] = features.dtype
        return features, q

    def spy_loss(q, k):
        loss, logits, labels = contrastive_loss(q, k)
        seen["logits"], seen["loss"] = logits.dtype, loss
        return loss, logits, labels

    model.encode_query, model.contrastive_loss = spy_query, spy_loss
    fit(model, tmp_path, precision="bf16-mixed")
    assert seen["features"] == torch.bfloat16  # the encoder really ran in bf16
    assert seen["logits"] == torch.float32 and model.queue.dtype == torch.float32
    assert torch.isfinite(seen["loss"]) and int(model.queue_ptr) == 0  # 2 steps x 4 keys in a queue of 8
    assert any(not torch.equal(a, b) for a, b in zip(before, model.encoder_q.parameters()))


@pytest.mark.timeout(120)
def test_channels_last_encoders_and_batches_train_like_the_default_layout(tmp_path):
    # plain BN: split BN's groups of 2 images are ill-conditioned enough (a variance over 2 samples) that the layouts'
    # different summation orders grow apart within two steps; tests/test_bn.py checks split BN's layouts exactly
    default, nhwc = small_moco(bn="none"), small_moco(bn="none", channels_last=True)
    conv = nhwc.encoder_k.backbone.conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    layouts = []
    nhwc.encoder_q.backbone.register_forward_pre_hook(
        lambda module, args: layouts.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    fit(default, tmp_path), fit(nhwc, tmp_path)
    assert layouts and all(layouts)  # every batch reached the encoder channels-last
    assert nhwc.encoder_q.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(default.state_dict().values(), nhwc.state_dict().values()):
        # the same training, another summation order (a layout bug is off by the size of the weights)
        torch.testing.assert_close(a, b, atol=3e-3, rtol=1e-2)


@pytest.mark.timeout(180)
def test_compile_runs_the_compiled_backbones_for_a_few_steps(tmp_path):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    tiny = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten())
    # aot_eager: dynamo's graph capture and AOT autograd as with the default backend, without the C++ codegen
    # (minutes on a cold CPU cache); benchmarks/gpu_step.py runs the default inductor backend.
    model = MoCo(tiny, feature_dim=8, dim=8, queue_size=8, momentum=0.9, temperature=0.2, lr=0.05,
                 compile={"backend": "aot_eager"}, bn_splits=2)
    fit(model, tmp_path, steps=3)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 2  # query (train) and key (no_grad) graphs
    assert not any("_orig_mod" in key for key in model.state_dict())  # checkpoints keep their names
    assert int(model.queue_ptr) == 4  # 3 steps of 4 keys in a queue of 8
    torch._dynamo.reset()


# ------------------------------------------------------------------ no host-device synchronisation in the step
# On the CPU there is no synchronisation to observe, so the step runs on the meta device: meta tensors have a shape
# but no values, and every host read of a device value (.item(), int(), float(), bool(), .tolist(), nonzero,
# unique, boolean-mask indexing: what makes the host wait for a GPU) raises there. Host-side tensors (the
# augmentation's parameters, on the CPU by design) stay readable.
def meta_step(model: MoCo, batch) -> dict[str, torch.Tensor]:
    """One training step of ``model`` on the meta device outside Lightning: step, backward, SGD, EMA; the logs."""
    model.configure_bn(1)  # the one-process BN of a Lightning run (split), converted before the move
    model.to("meta")
    params = [p for name, p in model.named_parameters() if p.requires_grad and not name.startswith("encoder_k.")]
    optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-4)
    logged: dict[str, torch.Tensor] = {}
    model.log_dict = lambda metrics, **kwargs: logged.update(metrics)
    model.log = lambda name, value, **kwargs: logged.__setitem__(name, value)
    model._trainer = SimpleNamespace(optimizers=[optimizer], global_step=0)
    out = model.training_step(batch, 0)
    out["loss"].backward()
    optimizer.step()
    model.momentum_update(0.9)
    logged["train/momentum"] = device_scalar(model, "momentum", 0.9)
    return logged


@pytest.mark.parametrize("recipe", ["v2", "digits"])
def test_augmentation_and_step_read_no_device_value(recipe):
    augment = build_batch_augmentation(recipe, SIZE, (0.5,) * 3, (0.25,) * 3)
    images = torch.randint(0, 256, (4, 3, SIZE, SIZE), dtype=torch.uint8).to("meta")
    batch = (augment(images, torch.Generator().manual_seed(0)), torch.zeros(4, dtype=torch.long, device="meta"))
    logged = meta_step(small_moco(channels_last=True), batch)
    assert {"train/loss", "train/acc_top1", "train/acc_top5", "train/lr", "train/momentum"} <= set(logged)
    assert all(isinstance(v, torch.Tensor) and v.device.type == "meta" for v in logged.values())


def test_a_host_read_in_the_step_is_caught():
    class ReadsTheLoss(MoCo):
        def contrastive_loss(self, q, k):
            loss, logits, labels = super().contrastive_loss(q, k)
            self.last_loss = float(loss)  # a host read: a sync on a GPU
            return loss, logits, labels

    torch.manual_seed(0)
    model = ReadsTheLoss("resnet18", cifar_stem=True, dim=8, queue_size=8, bn_splits=2)
    views = [torch.rand(4, 3, SIZE, SIZE, device="meta") for _ in range(2)]
    with pytest.raises((RuntimeError, NotImplementedError)):
        meta_step(model, (views, torch.zeros(4, dtype=torch.long, device="meta")))


@pytest.mark.timeout(300)
def test_the_gpu_benchmark_runs_end_to_end_at_smoke_settings_on_the_cpu(tmp_path):
    """benchmarks/gpu_step.py is run by hand when a GPU is lent: it must not be found broken then."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_step.py"
    out = tmp_path / "gpu_step.json"
    command = [sys.executable, str(script), "--device", "cpu", "--backbone", "resnet18", "--batch", "8", "--size",
               "32", "--queue", "64", "--steps", "2", "--warmup", "1", "--compile-backend", "aot_eager",
               "--precision", "32", "--bn", "none", "--no-results-md", "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=280)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(out.read_text())["results"]  # the table the GPU run writes into RESULTS.md
    assert [r["variant"] for r in results] == ["eager", "compile"]
    assert all(r["step_images_per_s"] > 0 and r["loop_images_per_s"] > 0 and r["profile"] for r in results)
