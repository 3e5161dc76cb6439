"""MoCo v3: the official builder's contract, heads, momentum schedule and a few steps of fit (ResNet and ViT)."""

import copy
import math

import lightning as L
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from moco_lightning import MoCoV3
from moco_lightning.losses import moco_v3_loss
from moco_lightning.vit import MoCoViT
from two_view_noise import SIZE, TwoViewNoise


def tiny_vit(freeze_patch_embed: bool = True) -> MoCoViT:
    return MoCoViT(embed_dim=16, depth=1, num_heads=2, image_size=SIZE, patch_size=4,
                   freeze_patch_embed=freeze_patch_embed)


def small_convnet() -> nn.Module:
    """A backbone much cheaper than a ResNet, for the tests that are not about the backbone."""
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def tiny_v3(backbone="resnet18", **kwargs) -> MoCoV3:
    if backbone == "convnet":
        backbone = small_convnet()
    defaults = dict(dim=8, mlp_dim=16, temperature=0.2, momentum=0.9,  # ImageNet stem: 8 px -> 2 px, cheap
                    optimizer="sgd", lr=0.05, warmup_epochs=0)
    defaults.update(kwargs)
    return MoCoV3(backbone, **defaults)


def tiny_trainer(**kwargs) -> L.Trainer:
    defaults = dict(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False)
    defaults.update(kwargs)
    return L.Trainer(**defaults)


def loader(n: int = 16, batch_size: int = 4) -> DataLoader:
    return DataLoader(TwoViewNoise(n), batch_size=batch_size, shuffle=False, drop_last=True)


def layer_types(mlp: nn.Sequential) -> list[type]:
    return [type(m) for m in mlp]


# ---------------------------------------------------------------------------------------------- structure
def test_resnet_gets_a_two_layer_projector_with_last_bn_and_a_predictor_without():
    model = tiny_v3()
    projector, predictor = model.base_encoder.head, model.predictor
    assert layer_types(projector) == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d]
    assert (projector[0].in_features, projector[0].out_features, projector[3].out_features) == (512, 16, 8)
    assert layer_types(predictor) == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert (predictor[0].in_features, predictor[3].out_features) == (8, 8)


def test_vit_gets_a_three_layer_projector_and_a_predictor_both_with_last_bn():
    model = tiny_v3(tiny_vit())
    projector, predictor = model.base_encoder.head, model.predictor
    assert layer_types(projector) == [nn.Linear, nn.BatchNorm1d, nn.ReLU] * 2 + [nn.Linear, nn.BatchNorm1d]
    assert projector[0].in_features == 16 and model.feature_dim == 16
    assert layer_types(predictor) == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d]


def test_momentum_encoder_starts_as_a_copy_of_the_base_encoder_and_gets_no_gradient():
    model = tiny_v3()
    base = dict(model.base_encoder.named_parameters())
    momentum = dict(model.momentum_encoder.named_parameters())
    assert set(base) == set(momentum)  # backbone + projector; the predictor has no momentum copy
    for name, b in base.items():
        assert torch.equal(b, momentum[name]), name
        assert b.requires_grad and not momentum[name].requires_grad


def test_last_bn_of_each_residual_block_starts_at_zero():
    backbone = tiny_v3().base_encoder.backbone
    blocks = [b for layer in (backbone.layer1, backbone.layer2, backbone.layer3, backbone.layer4) for b in layer]
    assert len(blocks) == 8 and all(torch.all(b.bn2.weight == 0) for b in blocks)  # BasicBlock: bn2 is the last
    assert all(torch.all(b.bn1.weight == 1) for b in blocks)  # the other BNs keep their usual init
    assert torch.all(tiny_v3(zero_init_residual=False).base_encoder.backbone.layer1[0].bn2.weight == 1)


# ---------------------------------------------------------------------------------------------- the official contract
def test_forward_updates_the_momentum_encoder_with_m_then_returns_the_symmetric_loss():
    model = tiny_v3("convnet", temperature=0.5)
    with torch.no_grad():
        for p in model.base_encoder.parameters():
            p.add_(0.1 * torch.randn_like(p))  # base and momentum encoders now differ
    x1, x2 = torch.rand(4, 3, SIZE, SIZE), torch.rand(4, 3, SIZE, SIZE)
    base, momentum, predictor = (copy.deepcopy(m) for m in (model.base_encoder, model.momentum_encoder,
                                                           model.predictor))
    with torch.no_grad():
        for pm, pb in zip(momentum.parameters(), base.parameters()):
            pm.copy_(0.3 * pm + 0.7 * pb)

    loss = model(x1, x2, 0.3)

    for pm, pe in zip(model.momentum_encoder.parameters(), momentum.parameters()):
        torch.testing.assert_close(pm, pe)
    q1, q2 = predictor(base(x1)), predictor(base(x2))
    k1, k2 = momentum(x1), momentum(x2)
    expected = moco_v3_loss(q1, k2, 0.5) + moco_v3_loss(q2, k1, 0.5)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert all(p.grad is None for p in model.momentum_encoder.parameters())
    assert all(p.grad is not None for p in model.predictor.parameters())


def test_contrastive_loss_is_the_official_one_with_the_module_temperature():
    model = tiny_v3("convnet", temperature=0.7)
    q, k = torch.randn(4, 8), torch.randn(4, 8)
    torch.testing.assert_close(model.contrastive_loss(q, k), moco_v3_loss(q, k, 0.7))


def test_embed_gives_backbone_features_and_project_the_normalised_projector_output():
    model = tiny_v3("convnet").eval()
    x = torch.rand(3, 3, SIZE, SIZE)
    assert model.embed(x).shape == (3, 8)
    z = model.project(x)
    torch.testing.assert_close(z, F.normalize(model.base_encoder(x), dim=1))
    torch.testing.assert_close(z.norm(dim=1), torch.ones(3))
    assert not torch.allclose(z, F.normalize(model.predictor(model.base_encoder(x)), dim=1))


# ---------------------------------------------------------------------------------------------- momentum
class _Run:
    """The bits of a Trainer that the momentum schedule reads."""

    def __init__(self, total: int) -> None:
        self.estimated_stepping_batches, self.global_step = total, 0


@pytest.mark.parametrize(("step", "expected"), [
    (0, 0.99),  # before the first step: m0
    (1, 1 - 0.5 * (1 + math.cos(math.pi / 100)) * 0.01),  # after the first step
    (50, 0.995),  # half-way: m0 + (1 - m0) / 2
    (100, 1.0),  # after the last step
])
def test_cosine_momentum_rises_from_m0_to_one_over_all_steps(step, expected):
    model = tiny_v3("convnet", momentum=0.99)
    model._trainer = _Run(total=100)
    assert model.momentum_at(step) == pytest.approx(expected, abs=1e-12)
    constant = tiny_v3("convnet", momentum=0.99, momentum_schedule="constant")
    constant._trainer = _Run(total=100)
    assert constant.momentum_at(step) == 0.99


class _RecordWeights(L.Callback):
    def __init__(self) -> None:
        self.base, self.momentum = [], []

    def on_train_start(self, trainer, pl_module) -> None:
        self.base.append(pl_module.base_encoder.head[0].weight.detach().clone())
        self.momentum.append(pl_module.momentum_encoder.head[0].weight.detach().clone())

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.on_train_start(trainer, pl_module)


def test_momentum_encoder_follows_the_official_sequence_of_weights():
    """Official loop: at the start of iteration i, θk ← m(i/T)·θk + (1 − m(i/T))·θb(after i steps), then the keys.

    This module updates after optimizer step j with m(j/T): the encoder computing the keys of every step must be
    the official one, and the momentum after the last step is 1.
    """
    model, record = tiny_v3("convnet", momentum=0.5), _RecordWeights()
    trainer = tiny_trainer(max_steps=3, callbacks=[record])
    trainer.fit(model, loader())
    total = 3
    official_k = record.base[0].clone()  # iteration 0: m(0) applied to equal encoders, a no-op
    for i in range(1, total + 1):
        m = 1 - 0.5 * (1 + math.cos(math.pi * i / total)) * (1 - 0.5)
        official_k = m * official_k + (1 - m) * record.base[i]
        torch.testing.assert_close(record.momentum[i], official_k)
    assert float(trainer.logged_metrics["train/momentum"]) == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------- fit
def test_a_few_steps_of_fit_train_a_resnet_with_lars_and_warm_up():
    # constant m: with the cosine the update after the last of 2 steps has m = 1, and the first step has lr 0
    model = tiny_v3(optimizer="lars", lr=0.6, warmup_epochs=1, weight_decay=1e-6, momentum_schedule="constant")
    before = copy.deepcopy(model.state_dict())
    trainer = tiny_trainer(max_steps=2)
    trainer.fit(model, loader())  # 4 steps per epoch
    assert trainer.global_step == 2
    assert type(trainer.optimizers[0]).__name__ == "LARS"
    group = trainer.optimizers[0].param_groups[0]
    assert group["initial_lr"] == pytest.approx(0.6 * 4 / 256)  # base lr x batch 4 / 256
    assert group["lr"] == pytest.approx(group["initial_lr"] * 2 / 4)  # linear warm-up from 0 over 4 steps
    optimized = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert not optimized & {id(p) for p in model.momentum_encoder.parameters()}
    assert {id(p) for p in model.predictor.parameters()} <= optimized
    name = "base_encoder.head.0.weight"
    assert not torch.equal(model.state_dict()[name], before[name])
    assert not torch.equal(model.state_dict()[name.replace("base", "momentum")], before[name])
    logged = trainer.logged_metrics
    assert {"train/loss", "train/lr", "train/momentum"} <= set(logged) and torch.isfinite(logged["train/loss"])
    assert 0.0 <= float(logged["train/acc_top1"]) <= 1.0


@pytest.fixture(scope="module")
def fitted_vit():
    torch.manual_seed(0)
    model = tiny_v3(tiny_vit(freeze_patch_embed=True), optimizer="adamw", lr=1e-3, weight_decay=0.1)
    before = copy.deepcopy(model.state_dict())
    trainer = tiny_trainer(max_steps=2)
    trainer.fit(model, loader())
    return model, before, trainer


def test_a_few_steps_of_fit_train_a_vit_with_adamw(fitted_vit):
    model, before, trainer = fitted_vit
    assert trainer.global_step == 2 and isinstance(trainer.optimizers[0], torch.optim.AdamW)
    name = "base_encoder.backbone.blocks.0.attn.qkv.weight"
    assert not torch.equal(model.state_dict()[name], before[name])
    assert torch.isfinite(trainer.logged_metrics["train/loss"])


def test_frozen_patch_projection_stays_frozen_through_fit(fitted_vit):
    model, before, trainer = fitted_vit
    for encoder in ("base_encoder", "momentum_encoder"):
        for leaf in ("weight", "bias"):
            key = f"{encoder}.backbone.patch_embed.proj.{leaf}"
            assert torch.equal(model.state_dict()[key], before[key]), key
    optimized = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert id(model.base_encoder.backbone.patch_embed.proj.weight) not in optimized


def test_fixed_position_embedding_is_no_parameter_and_does_not_move(fitted_vit):
    model, before, _ = fitted_vit
    assert not any("pos_embed" in name for name, _ in model.named_parameters())
    key = "base_encoder.backbone.pos_embed"
    assert key in model.state_dict() and torch.equal(model.state_dict()[key], before[key])


# ---------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(("kwargs", "setting"), [
    ({"temperature": 0.0}, "temperature"),
    ({"momentum": 1.5}, "momentum"),
    ({"optimizer": "adam"}, "optimizer"),
    ({"momentum_schedule": "linear"}, "momentum_schedule"),
])
def test_bad_settings_are_errors_naming_the_setting(kwargs, setting):
    with pytest.raises(ValueError, match=setting):
        tiny_v3("convnet", **kwargs)


@pytest.mark.timeout(180)
def test_channels_last_and_compile_train_like_the_default_layout():
    torch.manual_seed(0)
    default = tiny_v3("convnet", momentum_schedule="constant")
    torch.manual_seed(0)
    fast = tiny_v3("convnet", momentum_schedule="constant", channels_last=True, compile={"backend": "aot_eager"})
    layouts = []
    fast.base_encoder.backbone.register_forward_pre_hook(
        lambda module, args: layouts.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    for model in (default, fast):
        torch.manual_seed(0)
        tiny_trainer(max_steps=2).fit(model, loader())
    assert layouts and all(layouts)  # the batches reached the compiled backbone channels-last
    assert fast.momentum_encoder.backbone[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert not any("_orig_mod" in key for key in fast.state_dict())  # checkpoints keep their names
    for a, b in zip(default.state_dict().values(), fast.state_dict().values()):
        torch.testing.assert_close(a, b, atol=3e-3, rtol=1e-2)  # another summation order, the same training
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------- bn setting
def _setup_as_under_ddp(model: MoCoV3, world_size: int) -> MoCoV3:
    """Run ``setup("fit")`` as a CPU DDP run of ``world_size`` processes would (no process group needed)."""
    from types import SimpleNamespace

    model._trainer = SimpleNamespace(world_size=world_size,
                                     strategy=SimpleNamespace(root_device=torch.device("cpu")))
    model.setup("fit")
    return model


@pytest.mark.parametrize(("bn", "converted"), [("sync", True), ("auto", True), ("none", False)])
def test_bn_sync_normalises_over_all_processes_and_none_keeps_plain_bn(bn, converted):
    from moco_lightning.bn import AllReduceBatchNorm1d, AllReduceBatchNorm2d

    model = _setup_as_under_ddp(tiny_v3("convnet", bn=bn), world_size=2)
    assert model.hparams.bn == bn and model.bn_mode == ("none" if bn == "none" else "sync")
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    all_reduce = [isinstance(m, AllReduceBatchNorm1d | AllReduceBatchNorm2d) for m in bns]
    assert bns and all(all_reduce) if converted else not any(all_reduce)
    one_process = _setup_as_under_ddp(tiny_v3("convnet", bn=bn), world_size=1)  # one process: plain BN whatever bn says
    assert not any(isinstance(m, AllReduceBatchNorm2d) for m in one_process.modules())


@pytest.mark.parametrize("bn", ["shuffle", "split", "split_noshuffle", "sinc"])
def test_bn_modes_of_the_queue_are_refused_with_the_v3_values(bn):
    with pytest.raises(ValueError, match=f"bn={bn} is not a BN mode of MoCo v3; choose one of auto, sync, none"):
        tiny_v3("convnet", bn=bn)
