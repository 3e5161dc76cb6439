"""MoCo v3 checkpoints downstream: their base backbone is read, evaluated (kNN, linear) and exported (DeiT)."""

from functools import partial

import pytest
import torch
from eval_helpers import BlobsDataModule, make_blobs, save_checkpoint, tiny_trainer
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from moco_lightning import MoCoV3, backbones, vit
from moco_lightning.cli.export import main as export_main
from moco_lightning.eval.checkpoint import load_backbone, read_backbone_checkpoint
from moco_lightning.eval.export import export_deit, export_torchvision
from moco_lightning.eval.knn import knn_accuracy
from moco_lightning.eval.linear import linear_eval

TEST_VIT = {"embed_dim": 16, "depth": 1, "num_heads": 2}  # a ViT registered by name for these tests only


@pytest.fixture
def vit_test_name(monkeypatch) -> str:
    monkeypatch.setitem(vit.VIT_SIZES, "vit_test", TEST_VIT)
    monkeypatch.setitem(backbones.VITS, "vit_test", partial(vit.build_vit, "vit_test"))
    monkeypatch.setitem(backbones.BACKBONES, "vit_test", backbones.VITS["vit_test"])
    return "vit_test"


def _moved_bn(model: MoCoV3) -> MoCoV3:
    model.train()
    with torch.no_grad():
        model.embed(make_blobs(16, seed=3)[0])  # BN statistics off their defaults, so copies are checked for real
    return model.eval()


@pytest.fixture(scope="module")
def v3_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = _moved_bn(MoCoV3("resnet18", dim=8, mlp_dim=16))  # ImageNet stem: cheap on 8 px blobs
    return model, save_checkpoint(model, tmp_path_factory.mktemp("v3") / "mocov3.ckpt")


def test_the_base_backbone_of_a_v3_checkpoint_is_read_with_its_architecture(v3_checkpoint):
    model, path = v3_checkpoint
    backbone, dim, ckpt = load_backbone(path)
    assert (dim, ckpt.backbone, ckpt.cifar_stem, ckpt.source) == (512, "resnet18", False, "moco_lightning")
    assert not any(k.startswith(("head", "momentum", "predictor", "base_encoder")) for k in ckpt.state_dict)
    x = make_blobs(4, seed=5)[0]
    torch.testing.assert_close(backbone(x), model.embed(x))


def test_the_query_encoder_of_a_v3_checkpoint_is_backbone_and_projector_not_predictor(v3_checkpoint):
    from moco_lightning.eval.checkpoint import load_query_encoder

    model, path = v3_checkpoint
    encoder, dim, _ = load_query_encoder(path)
    x = make_blobs(4, seed=6)[0]
    assert dim == 8
    torch.testing.assert_close(encoder(x), model.project(x))


def test_knn_and_linear_evaluation_run_on_a_v3_checkpoint(v3_checkpoint):
    _, path = v3_checkpoint
    dm = BlobsDataModule()
    backbone, _, _ = load_backbone(path)
    knn = knn_accuracy(backbone, dm.eval_train_dataloader(), dm.eval_val_dataloader(), num_classes=4)
    assert 0.0 <= knn["top1"] <= knn["top5"] <= 1.0
    trainer = tiny_trainer(max_epochs=1)
    result = linear_eval(path, dm, lr=0.1, scale_lr=True, schedule="cosine", trainer=trainer)  # the v3 protocol
    assert 0.0 <= result["top1"] <= 1.0
    assert trainer.optimizers[0].param_groups[0]["initial_lr"] == pytest.approx(0.1 * dm.batch_size / 256)


def test_official_v3_resnet_checkpoint_drops_projector_predictor_and_momentum_encoder(v3_checkpoint, tmp_path):
    model, _ = v3_checkpoint
    state = {f"module.base_encoder.{k}": v for k, v in model.base_encoder.backbone.state_dict().items()}
    state["module.base_encoder.fc.0.weight"] = torch.zeros(16, 512)  # the official projector lives in fc
    state["module.momentum_encoder.conv1.weight"] = torch.zeros(1)
    state["module.predictor.0.weight"] = torch.zeros(16, 8)
    path = tmp_path / "r-50-100ep.pth.tar"
    torch.save({"epoch": 100, "arch": "resnet18", "state_dict": state}, path)
    backbone, dim, ckpt = load_backbone(path)
    assert ckpt.source == "official" and not ckpt.cifar_stem and dim == 512 and "fc.0.weight" not in ckpt.state_dict
    x = make_blobs(2, seed=6)[0]
    torch.testing.assert_close(backbone(x), model.embed(x))


def test_a_vit_checkpoint_is_rebuilt_with_its_image_and_patch_size(vit_test_name):
    model = MoCoV3(vit_test_name, image_size=8, patch_size=4, dim=8, mlp_dim=16).eval()
    ckpt = read_backbone_checkpoint({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)})
    assert ckpt.backbone_options == {"image_size": 8, "patch_size": 4}
    backbone, dim, _ = load_backbone(ckpt)
    x = torch.randn(2, 3, 8, 8)
    assert dim == 16
    torch.testing.assert_close(backbone(x), model.embed(x))
    # the official v3 layout of the same weights, head (projector) dropped
    official = {f"module.base_encoder.{k}": v for k, v in model.base_encoder.backbone.state_dict().items()}
    official.update({f"module.base_encoder.head.{k}": v for k, v in model.base_encoder.head.state_dict().items()})
    loaded, _, ckpt = load_backbone({"arch": vit_test_name, "state_dict": official})
    assert ckpt.source == "official" and not any(k.startswith("head") for k in ckpt.state_dict)
    torch.testing.assert_close(loaded(x), model.embed(x))


def test_a_vit_exports_as_the_deit_state_dict_of_convert_to_deit(vit_test_name, tmp_path):
    model = MoCoV3(vit_test_name, image_size=8, patch_size=4, dim=8, mlp_dim=16).eval()
    path = save_checkpoint(model, tmp_path / "vit.ckpt")
    exported = torch.load(export_deit(path, tmp_path / "deit.pth"), weights_only=True)
    assert set(exported) == {"model"}
    deit = VisionTransformer(img_size=8, patch_size=4, num_classes=10, norm_layer=partial(nn.LayerNorm, eps=1e-6),
                             **TEST_VIT)
    result = deit.load_state_dict(exported["model"], strict=False)
    assert sorted(result.missing_keys) == ["head.bias", "head.weight"] and not result.unexpected_keys
    deit.reset_classifier(0)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(deit.eval()(x), model.embed(x))
    with pytest.raises(ValueError, match="deit"):  # torchvision / detectron2 are for ResNets
        export_torchvision(path, tmp_path / "tv.pth")
    export_main([str(path)])  # the command line: every format that fits, here DeiT only
    assert (tmp_path / "vit_deit.pth").is_file() and not (tmp_path / "vit_torchvision.pth").exists()
