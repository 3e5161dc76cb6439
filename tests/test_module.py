import copy
import math

import lightning as L
import pytest
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader

from moco_lightning import MoCo
from two_view_noise import SIZE, TwoViewNoise

# the tiny loaders hold as many images as the queue; the one test about that warning asserts it explicitly
pytestmark = pytest.mark.filterwarnings("ignore:queue_size=16 is not smaller than the training set")


def tiny_moco(**kwargs) -> MoCo:
    # plain BN unless a test asks for another mode: the tiny batches of 4 are no multiple of 8 split-BN groups
    defaults = dict(backbone="resnet18", cifar_stem=True, dim=8, queue_size=16, momentum=0.9, temperature=0.2,
                    lr=0.01, lr_schedule="cosine", bn="none")
    defaults.update(kwargs)
    return MoCo(**defaults)


def tiny_trainer(tmp_path, **kwargs) -> L.Trainer:
    defaults = dict(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    defaults.update(kwargs)
    return L.Trainer(**defaults)


def loader(n: int = 16, batch_size: int = 4, drop_last: bool = True) -> DataLoader:
    return DataLoader(TwoViewNoise(n), batch_size=batch_size, shuffle=False, drop_last=drop_last)


def test_forward_returns_official_logits_and_enqueues_keys():
    model = tiny_moco()
    x_q, x_k = torch.rand(4, 3, SIZE, SIZE), torch.rand(4, 3, SIZE, SIZE)
    queue_before = model.queue.clone()
    probe_k = copy.deepcopy(model.encoder_k)
    probe_q = copy.deepcopy(model.encoder_q)

    logits, labels = model(x_q, x_k)

    q = F.normalize(probe_q(x_q), dim=1)
    k = F.normalize(probe_k(x_k), dim=1)
    assert logits.shape == (4, 1 + 16) and torch.equal(labels, torch.zeros(4, dtype=torch.long))
    torch.testing.assert_close(logits[:, 0], (q * k).sum(1) / 0.2)
    torch.testing.assert_close(logits[:, 1:], q @ queue_before.t() / 0.2)  # the queue before this step
    torch.testing.assert_close(model.queue[:4], k)
    assert torch.equal(model.queue[4:], queue_before[4:])
    assert int(model.queue_ptr) == 4


def test_embed_gives_backbone_features():
    model = tiny_moco()
    model.eval()
    assert model.embed(torch.rand(2, 3, SIZE, SIZE)).shape == (2, model.feature_dim) == (2, 512)


def test_key_encoder_gets_no_gradient_and_is_in_no_optimizer(tmp_path):
    model = tiny_moco()
    logits, labels = model(torch.rand(4, 3, SIZE, SIZE), torch.rand(4, 3, SIZE, SIZE))
    F.cross_entropy(logits, labels).backward()
    assert all(p.grad is None and not p.requires_grad for p in model.encoder_k.parameters())
    assert all(p.grad is not None for p in model.encoder_q.parameters())

    trainer = tiny_trainer(tmp_path, max_steps=1)
    trainer.fit(model, loader())
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in model.encoder_k.parameters()}
    assert {id(p) for p in model.encoder_q.parameters()} <= optimized


def test_fit_runs_moves_both_encoders_and_fills_queue(tmp_path):
    model = tiny_moco()
    q_before = copy.deepcopy(model.encoder_q.state_dict())
    k_before = copy.deepcopy(model.encoder_k.state_dict())
    trainer = tiny_trainer(tmp_path, max_epochs=2)
    trainer.fit(model, loader())
    assert trainer.global_step == 8
    assert int(model.queue_ptr) == (8 * 4) % 16
    name = "backbone.conv1.weight"
    assert not torch.equal(model.encoder_q.state_dict()[name], q_before[name])
    assert not torch.equal(model.encoder_k.state_dict()[name], k_before[name])
    assert not torch.equal(model.encoder_k.state_dict()[name], model.encoder_q.state_dict()[name])
    logged = trainer.logged_metrics
    for key in ["train/loss", "train/acc_top1", "train/acc_top5", "train/pos_sim", "train/neg_sim", "train/lr",
                "train/momentum"]:
        assert key in logged, key
    assert torch.isfinite(logged["train/loss"])


class CountingMoCo(MoCo):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.updates = 0

    def momentum_update(self, m=None):
        self.updates += 1
        super().momentum_update(m)


def test_momentum_update_once_per_optimizer_step_under_accumulation(tmp_path):
    model = CountingMoCo(backbone="resnet18", cifar_stem=True, dim=8, queue_size=16, momentum=0.9, bn="none")
    trainer = tiny_trainer(tmp_path, accumulate_grad_batches=2)
    trainer.fit(model, loader(n=16, batch_size=4))  # 4 micro-batches -> 2 optimizer steps
    assert trainer.global_step == 2
    assert model.updates == 2


def test_key_encoder_sequence_matches_official_order(tmp_path):
    """After a step, θk = m·θk_prev + (1−m)·θq_after_step, with θk_prev = θq at init (m applies once)."""
    model = tiny_moco(momentum=0.5)
    theta0 = copy.deepcopy(model.encoder_q.head[0].weight.detach())
    trainer = tiny_trainer(tmp_path, max_steps=1)
    trainer.fit(model, loader())
    theta1 = model.encoder_q.head[0].weight.detach()
    torch.testing.assert_close(model.encoder_k.head[0].weight, 0.5 * theta0 + 0.5 * theta1)


def test_step_interval_checkpoint_holds_the_key_encoder_of_its_step(tmp_path):
    """A checkpoint written by a callback mid-epoch has seen as many EMA updates as optimizer steps."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    model = tiny_moco(momentum=0.5)
    every = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1, filename="{step}")
    trainer = tiny_trainer(tmp_path, max_steps=2, enable_checkpointing=True, callbacks=[every])
    trainer.fit(model, loader())
    ckpt = torch.load(tmp_path / "ckpt" / "step=2.ckpt", weights_only=False)
    state = ckpt["state_dict"]
    for name, value in model.encoder_k.state_dict().items():
        assert torch.equal(state[f"encoder_k.{name}"], value), name
    first = torch.load(tmp_path / "ckpt" / "step=1.ckpt", weights_only=False)["state_dict"]
    name = "head.0.weight"
    # after step 1: θk = 0.5·θq(init) + 0.5·θq(step 1); θk(init) = θq(init)
    assert not torch.equal(first[f"encoder_k.{name}"], first[f"encoder_q.{name}"])


def test_lr_is_constant_within_an_epoch_by_default(tmp_path):
    model = tiny_moco(lr=0.1)  # lr_interval="epoch" by default, as the official v1/v2 code
    lrs = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, *args):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    trainer = tiny_trainer(tmp_path, max_epochs=2, callbacks=[Record()])
    trainer.fit(model, loader())  # 4 steps per epoch
    assert lrs[:4] == pytest.approx([0.1] * 4)
    assert lrs[4:] == pytest.approx([0.1 * 0.5 * (1 + math.cos(math.pi / 2))] * 4)


def test_milestones_count_loader_epochs_when_only_max_steps_is_set(tmp_path):
    model = tiny_moco(lr=0.1, lr_schedule="step", lr_milestones=(1,), lr_interval="epoch")
    lrs = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, *args):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    trainer = tiny_trainer(tmp_path, max_epochs=-1, max_steps=6, callbacks=[Record()])
    trainer.fit(model, loader())  # 4 steps per epoch: epoch 1 starts at step 4 whatever max_steps says
    assert lrs == pytest.approx([0.1] * 4 + [0.01] * 2)


def test_checkpoint_restores_encoders_queue_and_pointer(tmp_path):
    model = tiny_moco()
    trainer = tiny_trainer(tmp_path, max_steps=3)
    trainer.fit(model, loader())
    path = tmp_path / "moco.ckpt"
    trainer.save_checkpoint(path)
    restored = MoCo.load_from_checkpoint(path)
    assert int(restored.queue_ptr) == int(model.queue_ptr) == 12
    for key, value in model.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key
    assert restored.hparams.queue_size == 16 and restored.hparams.backbone == "resnet18"


def test_queue_not_multiple_of_global_batch_fails_before_first_step(tmp_path):
    model = tiny_moco(queue_size=10)
    trainer = tiny_trainer(tmp_path)
    with pytest.raises(ValueError, match="queue_size=10 must be a multiple of the global batch size 4"):
        trainer.fit(model, loader())
    assert trainer.global_step == 0


def test_bf16_true_precision_is_refused_before_the_first_step(tmp_path):
    trainer = tiny_trainer(tmp_path, precision="bf16-true")
    with pytest.raises(ValueError, match="precision=bf16-true keeps the weights in 16 bits"):
        trainer.fit(tiny_moco(), loader())
    assert trainer.global_step == 0


def test_loader_without_drop_last_is_an_error(tmp_path):
    trainer = tiny_trainer(tmp_path)
    with pytest.raises(ValueError, match="drop_last=True"):
        trainer.fit(tiny_moco(), loader(drop_last=False))


def test_queue_as_large_as_dataset_warns(tmp_path):
    trainer = tiny_trainer(tmp_path, max_steps=1)
    with pytest.warns(UserWarning, match="not smaller than the training set"):
        trainer.fit(tiny_moco(queue_size=16), loader(n=16))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(temperature=0.0), "temperature=0.0 must be > 0"),
        (dict(momentum=1.2), r"momentum=1.2 must be in \[0, 1\]"),
        (dict(momentum_schedule="linear"), "momentum_schedule=linear must be one of constant, cosine"),
        (dict(dim=0), "dim=0 must be a positive"),
    ],
)
def test_bad_hyperparameters_are_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny_moco(**kwargs)


def test_cosine_momentum_schedule_rises_during_training(tmp_path):
    model = tiny_moco(momentum=0.9, momentum_schedule="cosine")
    trainer = tiny_trainer(tmp_path, max_steps=4)
    trainer.fit(model, loader())
    assert model.current_momentum == pytest.approx(1.0)  # step 4 of 4


def test_scale_lr_uses_global_batch(tmp_path):
    model = tiny_moco(lr=0.03, scale_lr=True, lr_schedule="constant")
    trainer = tiny_trainer(tmp_path, max_steps=1, accumulate_grad_batches=2)
    trainer.fit(model, loader(batch_size=4))
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.03 * 8 / 256)


class NoEnqueueMoCo(MoCo):
    """A user's variant that keeps the dictionary fixed."""

    def dequeue_and_enqueue(self, k):
        pass


def test_subclass_overriding_one_hook_changes_only_that():
    base = tiny_moco()
    child = NoEnqueueMoCo(**dict(base.hparams))
    child.load_state_dict(base.state_dict())
    x_q, x_k = torch.rand(4, 3, SIZE, SIZE), torch.rand(4, 3, SIZE, SIZE)
    queue_before = base.queue.clone()
    logits_base, _ = base(x_q, x_k)
    logits_child, _ = child(x_q, x_k)
    torch.testing.assert_close(logits_child, logits_base)  # same queries, keys and negatives
    assert torch.equal(child.queue, queue_before) and int(child.queue_ptr) == 0
    assert not torch.equal(base.queue, queue_before) and int(base.queue_ptr) == 4


def test_custom_backbone_module(tmp_path):
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    model = MoCo(backbone=net, dim=4, queue_size=8, temperature=0.2, bn="none")
    assert model.feature_dim == 6
    trainer = tiny_trainer(tmp_path, max_steps=2)
    trainer.fit(model, loader(n=16, batch_size=4))
    assert trainer.global_step == 2


# ---------------------------------------------------------------------------------------------- BN modes
def test_auto_bn_on_one_process_is_split_and_the_log_says_so(tmp_path, caplog):
    from moco_lightning.bn import SplitBatchNorm2d

    model = tiny_moco(bn="auto", bn_splits=2, queue_size=16)
    with caplog.at_level("INFO", logger="moco_lightning.module"):
        tiny_trainer(tmp_path, max_steps=1).fit(model, loader(n=16, batch_size=8))
    assert model.bn_mode == "split"
    assert "MoCo BN mode: split (bn=auto, 1 process(es))" in caplog.text
    for encoder in (model.encoder_q, model.encoder_k):
        bns = [m for m in encoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        assert bns and all(isinstance(m, SplitBatchNorm2d) and m.num_splits == 2 for m in bns)


def test_split_step_is_the_official_demo_step():
    """q from split BN; k from the key encoder on the batch shuffled on the device, un-shuffled after."""
    model = tiny_moco(bn="split", bn_splits=2)
    assert model.configure_bn() == "split"
    x_q, x_k = torch.rand(8, 3, SIZE, SIZE), torch.rand(8, 3, SIZE, SIZE)
    probe_q, probe_k = copy.deepcopy(model.encoder_q), copy.deepcopy(model.encoder_k)
    queue = model.queue.clone()
    torch.manual_seed(3)
    logits, _ = model(x_q, x_k)
    torch.manual_seed(3)
    perm = torch.randperm(8)
    q = F.normalize(probe_q(x_q), dim=1)
    k = F.normalize(probe_k(x_k[perm]), dim=1)[torch.argsort(perm)]
    torch.testing.assert_close(logits[:, 0], (q * k).sum(1) / 0.2)
    torch.testing.assert_close(logits[:, 1:], q @ queue.t() / 0.2)
    torch.testing.assert_close(model.queue[:8], k)


def test_split_noshuffle_step_keeps_each_query_and_its_key_in_one_group():
    """The paper's leaking ablation: split BN's groups, the key batch in order, so a pair shares its group."""
    from moco_lightning.bn import SplitBatchNorm2d

    model = tiny_moco(bn="split_noshuffle", bn_splits=2)
    assert model.configure_bn() == "split_noshuffle"
    bns = [m for m in model.encoder_k.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(isinstance(m, SplitBatchNorm2d) and m.num_splits == 2 for m in bns)
    x_q, x_k = torch.rand(8, 3, SIZE, SIZE), torch.rand(8, 3, SIZE, SIZE)
    probe_q, probe_k = copy.deepcopy(model.encoder_q), copy.deepcopy(model.encoder_k)
    torch.manual_seed(3)
    logits, _ = model(x_q, x_k)
    q = F.normalize(probe_q(x_q), dim=1)
    k = F.normalize(probe_k(x_k), dim=1)  # no shuffle: rows 0-3 and 4-7 are the groups of queries and keys alike
    torch.testing.assert_close(logits[:, 0], (q * k).sum(1) / 0.2)
    torch.testing.assert_close(model.queue[:8], k)
    torch.manual_seed(3)
    perm = torch.randperm(8)
    shuffled = F.normalize(probe_k(x_k[perm]), dim=1)[torch.argsort(perm)]
    assert not torch.allclose(k, shuffled, atol=1e-4)  # split mode's keys differ: other groups, other statistics


def test_split_bn_batch_not_a_multiple_of_the_groups_fails_before_the_first_step(tmp_path):
    model = tiny_moco(bn="split", bn_splits=8)
    trainer = tiny_trainer(tmp_path)
    with pytest.raises(ValueError, match="batch_size=4 must be a multiple of bn_splits=8"):
        trainer.fit(model, loader(batch_size=4))
    assert trainer.global_step == 0


def test_trainer_sync_batchnorm_is_refused_because_it_undoes_moco_bn(tmp_path):
    trainer = tiny_trainer(tmp_path, sync_batchnorm=True, strategy="ddp")  # a DDP run of one process
    try:
        with pytest.raises(ValueError, match="sync_batchnorm=True converts every BatchNorm"):
            trainer.fit(tiny_moco(), loader())
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


# ---------------------------------------------------------------------------------------------- symmetric loss
def test_symmetric_loss_sums_both_directions_against_the_same_queue_and_enqueues_both_keys():
    model = tiny_moco(symmetric=True)
    x1, x2 = torch.rand(4, 3, SIZE, SIZE), torch.rand(4, 3, SIZE, SIZE)
    probe_q, probe_k = copy.deepcopy(model.encoder_q), copy.deepcopy(model.encoder_k)
    queue = model.queue.clone()
    out = model.step(x1, x2)

    q1, q2 = F.normalize(probe_q(x1), dim=1), F.normalize(probe_q(x2), dim=1)
    k1, k2 = F.normalize(probe_k(x1), dim=1), F.normalize(probe_k(x2), dim=1)

    def info_nce(q, k):
        logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.t()], 1) / 0.2
        return F.cross_entropy(logits, torch.zeros(4, dtype=torch.long))

    torch.testing.assert_close(out["loss"], info_nce(q1, k2) + info_nce(q2, k1))  # summed, as the demo
    assert out["logits"].shape == (8, 17)
    torch.testing.assert_close(model.queue[:8], torch.cat([k1, k2]))
    assert int(model.queue_ptr) == 8


def test_symmetric_needs_a_queue_multiple_of_twice_the_global_batch(tmp_path):
    model = tiny_moco(symmetric=True, queue_size=12)  # 12 = 3 batches of 4, but 8 keys per step
    trainer = tiny_trainer(tmp_path)
    with pytest.raises(ValueError, match="queue_size=12 must be a multiple of twice the global batch size 4 .*"
                                         "use queue_size=8 or 16"):
        trainer.fit(model, loader(batch_size=4))


def test_project_gives_unit_embeddings_of_the_query_encoder():
    model = tiny_moco()
    model.eval()
    z = model.project(torch.rand(3, 3, SIZE, SIZE))
    assert z.shape == (3, 8)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(3))
