"""Official MoCo v3 checkpoints of the ViTs with a convolutional stem (vit_conv_small, vit_conv_base) downstream.

The official state dict is written out here key by key from the structure of facebookresearch/moco-v3 ``vits.py``
(``ConvStem`` inside timm's ``VisionTransformer``, one block less) and ``moco/builder.py`` (``base_encoder.head``: the
3-layer projector), independently of :mod:`moco_lightning.vit`: it must load, strictly, in eval_knn, eval_linear and
moco-export. Nothing is downloaded.
"""

from __future__ import annotations

import pytest
import torch
from eval_helpers import BlobsDataModule, tiny_trainer
from hydra import compose, initialize_config_dir
from torch.nn import functional as F

from moco_lightning.cli import CONFIG_PATH
from moco_lightning.cli.export import main as export_main
from moco_lightning.eval.checkpoint import load_query_encoder, read_backbone_checkpoint
from moco_lightning.eval.linear import linear_eval
from moco_lightning.vit import VIT_SIZES, build_vit

WIDTHS = {"vit_conv_small": 384, "vit_conv_base": 768}
MLP_DIM, DIM = 32, 16  # projector widths of the test checkpoint (official 4096, 256)


def _bn(prefix: str, width: int, affine: bool = True) -> dict[str, tuple[int, ...]]:
    shapes = {f"{prefix}.running_mean": (width,), f"{prefix}.running_var": (width,),
              f"{prefix}.num_batches_tracked": ()}
    if affine:
        shapes.update({f"{prefix}.weight": (width,), f"{prefix}.bias": (width,)})
    return shapes


def official_backbone_shapes(arch: str, image_size: int = 224) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of an official ``vits.vit_conv_*`` backbone without its head (timm 0.4.x names)."""
    d = WIDTHS[arch]
    shapes: dict[str, tuple[int, ...]] = {"cls_token": (1, 1, d), "pos_embed": (1, 1 + (image_size // 16) ** 2, d)}
    stem = [3, d // 8, d // 4, d // 2, d]  # four 3x3 stride-2 convs (no bias) + BN + ReLU, then a 1x1 conv
    for i in range(4):
        shapes[f"patch_embed.proj.{3 * i}.weight"] = (stem[i + 1], stem[i], 3, 3)
        shapes.update(_bn(f"patch_embed.proj.{3 * i + 1}", stem[i + 1]))
    shapes.update({"patch_embed.proj.12.weight": (d, d, 1, 1), "patch_embed.proj.12.bias": (d,)})
    for b in range(11):  # one block less than vit_small / vit_base
        block = f"blocks.{b}"
        for norm in ("norm1", "norm2"):
            shapes.update({f"{block}.{norm}.weight": (d,), f"{block}.{norm}.bias": (d,)})
        shapes.update({
            f"{block}.attn.qkv.weight": (3 * d, d), f"{block}.attn.qkv.bias": (3 * d,),
            f"{block}.attn.proj.weight": (d, d), f"{block}.attn.proj.bias": (d,),
            f"{block}.mlp.fc1.weight": (4 * d, d), f"{block}.mlp.fc1.bias": (4 * d,),
            f"{block}.mlp.fc2.weight": (d, 4 * d), f"{block}.mlp.fc2.bias": (d,),
        })
    shapes.update({"norm.weight": (d,), "norm.bias": (d,)})
    return shapes


def official_projector_shapes(width: int) -> dict[str, tuple[int, ...]]:
    """The official ViT projector ``_build_mlp(3, D, mlp_dim, dim)``: Linear-BN-ReLU twice, Linear, affine-free BN."""
    return {"0.weight": (MLP_DIM, width), **_bn("1", MLP_DIM), "3.weight": (MLP_DIM, MLP_DIM), **_bn("4", MLP_DIM),
            "6.weight": (DIM, MLP_DIM), **_bn("7", DIM, affine=False)}


def _tensor(key: str, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    if key.endswith("num_batches_tracked"):
        return torch.tensor(100)
    if key.endswith("running_var"):
        return torch.rand(shape, generator=g) + 0.5
    return 0.02 * torch.randn(shape, generator=g)


def official_checkpoint(arch: str, image_size: int) -> dict:
    """A checkpoint as the official ``main_moco.py`` saves it (DDP names, momentum encoder and predictor included)."""
    g = torch.Generator().manual_seed(0)
    backbone = official_backbone_shapes(arch, image_size)
    state = {f"module.base_encoder.{k}": _tensor(k, s, g) for k, s in backbone.items()}
    head = official_projector_shapes(WIDTHS[arch])
    state.update({f"module.base_encoder.head.{k}": _tensor(k, s, g) for k, s in head.items()})
    # the momentum encoder (a copy of the base encoder) and the predictor, which downstream use drops: one key each
    state["module.momentum_encoder.cls_token"] = state["module.base_encoder.cls_token"].clone()
    state["module.predictor.0.weight"] = torch.zeros(MLP_DIM, DIM)
    return {"epoch": 300, "arch": arch, "state_dict": state, "optimizer": {}, "scaler": {}}


@pytest.mark.parametrize("arch", sorted(WIDTHS))
def test_vit_conv_has_the_official_structure(arch):
    assert VIT_SIZES[arch]["depth"] == 11
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        model = build_vit(arch)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == official_backbone_shapes(arch)


@pytest.fixture(scope="module")
def official_file(tmp_path_factory):
    """An official vit_conv_small checkpoint at 16 px (one token: cheap), written to disk."""
    path = tmp_path_factory.mktemp("official") / "vit-conv-s-300ep.pth.tar"
    ckpt = official_checkpoint("vit_conv_small", image_size=16)
    torch.save(ckpt, path)
    return path, ckpt


def test_official_vit_conv_checkpoint_loads_its_base_backbone_and_projector_strictly(official_file):
    path, ckpt = official_file
    read = read_backbone_checkpoint(path)
    assert (read.backbone, read.source) == ("vit_conv_small", "official")
    assert read.backbone_options == {"image_size": 16, "patch_size": 16}  # read from the weights' shapes
    encoder, out_dim, _ = load_query_encoder(read)  # the backbone (as load_backbone builds it) + the projector
    assert out_dim == DIM and encoder(torch.randn(2, 3, 16, 16)).shape == (2, DIM)
    loaded = {f"module.base_encoder.{k}": v for k, v in encoder.backbone.state_dict().items()}
    loaded.update({f"module.base_encoder.head.{k}": v for k, v in encoder.head.state_dict().items()})
    official = {k: v for k, v in ckpt["state_dict"].items() if k.startswith("module.base_encoder.")}
    assert loaded.keys() == official.keys()
    for key, tensor in official.items():
        torch.testing.assert_close(loaded[key], tensor, msg=key)
    assert encoder.backbone(torch.randn(2, 3, 16, 16)).shape == (2, 384)


def _compose(name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=CONFIG_PATH, version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


@pytest.mark.timeout(240)
def test_eval_knn_and_eval_linear_run_on_an_official_vit_conv_checkpoint(official_file, monkeypatch):
    from moco_lightning.cli import eval_knn

    path, _ = official_file
    seen = {}

    def few_images_knn(embed, train_loader, val_loader, **kwargs):  # the kNN itself is tested elsewhere
        seen["features"] = embed(next(iter(val_loader))[0][:4])
        return {"top1": 0.5, "top5": 0.9}

    monkeypatch.setattr(eval_knn, "knn_accuracy", few_images_knn)
    knn = eval_knn.evaluate_knn(_compose("eval_knn", [f"checkpoint={path}", "device=cpu", "data.image_size=16"]))
    assert (knn["backbone"], knn["feature_dim"]) == ("vit_conv_small", 384) and seen["features"].shape == (4, 384)

    blobs = BlobsDataModule(batch_size=8, n_train=16, n_val=8)  # 8 px blobs, upsampled to the stem's 16 px
    blobs.train, blobs.val = [(F.interpolate(x, size=16), y) for x, y in (blobs.train, blobs.val)]
    trainer = tiny_trainer(max_epochs=1)
    result = linear_eval(path, blobs, lr=0.1, scale_lr=True, schedule="cosine", trainer=trainer)  # eval_linear's
    assert 0.0 <= result["top1"] <= 1.0 and trainer.global_step == 2


def test_moco_export_writes_an_official_vit_conv_checkpoint_as_deit(official_file, tmp_path):
    path, ckpt = official_file
    out = tmp_path / "vit_conv_s_deit.pth"
    export_main([str(path), "--format", "deit", "--output", str(out)])
    exported = torch.load(out, weights_only=True)["model"]
    backbone_keys = {k.removeprefix("module.base_encoder.") for k in ckpt["state_dict"]
                     if k.startswith("module.base_encoder.") and not k.startswith("module.base_encoder.head.")}
    assert set(exported) == backbone_keys  # what the official convert_to_deit.py keeps: the backbone, no head
    assert read_backbone_checkpoint(path).backbone_options  # what makes the default format "auto" pick DeiT
