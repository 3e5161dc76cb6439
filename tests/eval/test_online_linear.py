import pytest
import torch
from eval_helpers import NUM_CLASSES, BlobsDataModule, tiny_moco, tiny_trainer

from moco_lightning.eval.online_linear import OnlineLinearProbe


def _fit(callbacks, steps=2):
    torch.manual_seed(0)
    model = tiny_moco()
    trainer = tiny_trainer(max_epochs=1, limit_train_batches=steps, callbacks=callbacks)
    trainer.fit(model, datamodule=BlobsDataModule())
    return model, trainer


@pytest.mark.timeout(120)
def test_online_probe_trains_its_classifier_and_leaves_pretraining_unchanged():
    probe = OnlineLinearProbe(lr=0.1)
    with_probe, trainer = _fit([probe])
    assert probe.classifier is not None and probe.classifier.out_features == NUM_CLASSES  # from the datamodule
    assert probe.classifier.in_features == 512
    assert probe.optimizer.state  # it took SGD steps (momentum buffers exist)
    top1 = float(trainer.callback_metrics["train/online_linear_top1"])
    assert 0.0 <= top1 <= 1.0
    assert "train/online_linear_loss" in trainer.callback_metrics

    without, _ = _fit([])  # detached features, private init seed: the MoCo weights come out identical
    for (name, a), b in zip(with_probe.state_dict().items(), without.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=name)


def test_state_round_trip_restores_the_classifier():
    probe = OnlineLinearProbe(num_classes=3)

    class _Module:
        feature_dim = 5
        device = torch.device("cpu")

    probe.setup(None, _Module(), "fit")
    with torch.no_grad():
        probe.classifier.weight.fill_(0.25)
    state = probe.state_dict()
    restored = OnlineLinearProbe(num_classes=3)
    restored.load_state_dict(state)  # before setup: kept until the classifier exists
    restored.setup(None, _Module(), "fit")
    assert torch.equal(restored.classifier.weight, torch.full((3, 5), 0.25))


def test_training_step_without_features_is_a_clear_error():
    probe = OnlineLinearProbe(num_classes=3)
    with pytest.raises(RuntimeError, match="features"):
        probe.on_train_batch_end(None, tiny_moco(), torch.tensor(1.0), None, 0)
