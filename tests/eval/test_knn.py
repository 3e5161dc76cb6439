import math

import pytest
import torch
from eval_helpers import NUM_CLASSES, BlobsDataModule, tiny_moco, tiny_trainer
from torch.utils.data import DataLoader, TensorDataset

from moco_lightning.eval.knn import KNNMonitor, knn_accuracy, weighted_knn_predict


def _unit(deg: float) -> list[float]:
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


# Query at angle 0. Class 0: one bank sample at cos = 1. Class 1: two samples at cos(36.87 deg) = 0.8.
QUERY = torch.tensor([_unit(0)])
BANK = torch.tensor([_unit(0), _unit(36.87), _unit(-36.87)])
BANK_LABELS = torch.tensor([0, 1, 1])


def test_scores_are_sums_of_exp_similarity_over_temperature_per_class():
    scores = weighted_knn_predict(QUERY, BANK, BANK_LABELS, num_classes=2, k=3, temperature=0.1)
    expected = torch.tensor([[math.exp(1.0 / 0.1), 2 * math.exp(0.8 / 0.1)]])
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=0)


def test_low_temperature_lets_the_nearest_neighbour_outvote_a_majority():
    # t = 0.1: e^10 > 2 e^8, the single nearest neighbour wins; t = 1: e^1 < 2 e^0.8, the majority wins.
    sharp = weighted_knn_predict(QUERY, BANK, BANK_LABELS, num_classes=2, k=3, temperature=0.1)
    flat = weighted_knn_predict(QUERY, BANK, BANK_LABELS, num_classes=2, k=3, temperature=1.0)
    assert sharp.argmax(1).item() == 0
    assert flat.argmax(1).item() == 1


def test_only_the_k_nearest_neighbours_vote():
    scores = weighted_knn_predict(QUERY, BANK, BANK_LABELS, num_classes=2, k=1, temperature=1.0)
    assert scores[0, 1].item() == 0.0 and scores.argmax(1).item() == 0


def test_features_are_l2_normalised_so_scale_does_not_matter():
    a = weighted_knn_predict(QUERY * 7, BANK * torch.tensor([[3.0], [0.5], [9.0]]), BANK_LABELS, 2, k=3)
    b = weighted_knn_predict(QUERY, BANK, BANK_LABELS, 2, k=3)
    # scores up to exp(1 / 0.1): normalising 7x a vector rounds differently than the unit vector, so the
    # comparison is relative to the magnitude of the scores
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_chunked_queries_and_bank_give_the_same_scores():
    g = torch.Generator().manual_seed(0)
    queries, bank = torch.randn(37, 8, generator=g), torch.randn(101, 8, generator=g)
    labels = torch.randint(0, 5, (101,), generator=g)
    whole = weighted_knn_predict(queries, bank, labels, 5, k=20, chunk_size=1000)
    chunked = weighted_knn_predict(queries, bank, labels, 5, k=20, chunk_size=8, bank_chunk_size=16)
    # scores reach exp(1 / 0.1) ~ 2e4: blocks of another shape sum the similarities in another order (and AVX2 and
    # AVX-512 machines differ again), so compare relative to the magnitude, not with float32's default tolerance
    torch.testing.assert_close(chunked, whole, rtol=1e-4, atol=1e-6)


def test_k_larger_than_the_bank_uses_the_whole_bank():
    scores = weighted_knn_predict(QUERY, BANK, BANK_LABELS, num_classes=2, k=200, temperature=0.1)
    torch.testing.assert_close(scores[0].sum(), torch.tensor(math.exp(10) + 2 * math.exp(8)), rtol=1e-4, atol=0)


def test_half_precision_bank_gives_the_same_predictions():
    g = torch.Generator().manual_seed(0)
    queries, bank = torch.randn(50, 16, generator=g), torch.randn(200, 16, generator=g)
    labels = torch.randint(0, 4, (200,), generator=g)
    full = weighted_knn_predict(queries, bank, labels, 4, k=10)
    half = weighted_knn_predict(queries, bank.half(), labels, 4, k=10)
    assert half.dtype == torch.float32
    assert (full.argmax(1) == half.argmax(1)).float().mean() > 0.95


def test_mismatched_bank_labels_are_a_clear_error():
    with pytest.raises(ValueError, match="one label per bank feature"):
        weighted_knn_predict(QUERY, BANK, BANK_LABELS[:2], num_classes=2)


def test_knn_accuracy_on_loaders_is_perfect_for_separable_classes():
    # Embedding = identity on 2-D points: class c sits at angle 90c degrees, queries likewise.
    pts = torch.tensor([_unit(90 * c + d) for c in range(4) for d in (-10, 0, 10)])
    labels = torch.arange(4).repeat_interleave(3)
    train = DataLoader(TensorDataset(pts, labels), batch_size=5)
    val = DataLoader(TensorDataset(pts[1::3] * 2.0, labels[1::3]), batch_size=2)
    result = knn_accuracy(lambda x: x, train, val, k=3)
    assert result == {"top1": 1.0, "top5": 1.0}


def test_knn_accuracy_top1_counts_wrong_predictions():
    bank = torch.tensor([_unit(0), _unit(90)])
    train = DataLoader(TensorDataset(bank, torch.tensor([0, 1])), batch_size=2)
    # first query is nearest class 0 but labelled 1: half right; top-2 (= top-min(5, C)) always right
    val = DataLoader(TensorDataset(torch.tensor([_unit(5), _unit(85)]), torch.tensor([1, 1])), batch_size=2)
    result = knn_accuracy(lambda x: x, train, val, k=1, num_classes=2)
    assert result["top1"] == pytest.approx(0.5) and result["top5"] == pytest.approx(1.0)


@pytest.mark.timeout(120)
def test_monitor_logs_knn_accuracy_every_n_epochs_in_eval_mode_and_restores_train_mode():
    model = tiny_moco()
    modes_seen = []
    original_embed = model.embed

    def spy_embed(x):
        modes_seen.append(model.encoder_q.backbone.training)
        return original_embed(x)

    model.embed = spy_embed
    monitor = KNNMonitor(every_n_epochs=2, k=5)
    calls = []
    compute = monitor.compute
    monitor.compute = lambda trainer, pl_module: calls.append(trainer.current_epoch) or compute(trainer, pl_module)
    trainer = tiny_trainer(max_epochs=3, callbacks=[monitor], limit_train_batches=1)
    trainer.fit(model, datamodule=BlobsDataModule())
    assert calls == [1, 2]  # after the 2nd epoch, then after the last
    assert modes_seen and not any(modes_seen)  # embedded in eval mode
    assert model.encoder_q.backbone.training  # restored after the monitor
    logged = trainer.callback_metrics
    assert {"val/knn_top1", "val/knn_top5"} <= set(logged)
    assert 0.0 <= float(logged["val/knn_top1"]) <= float(logged["val/knn_top5"]) <= 1.0
    # the blobs are separable even for an untrained encoder
    assert float(logged["val/knn_top1"]) > 1.5 / NUM_CLASSES


@pytest.mark.timeout(120)
def test_monitor_leaves_the_training_run_unchanged():
    def run(callbacks):
        torch.manual_seed(0)
        model = tiny_moco()
        trainer = tiny_trainer(max_epochs=2, callbacks=callbacks, limit_train_batches=1)
        trainer.fit(model, datamodule=BlobsDataModule())
        return model

    with_monitor, without = run([KNNMonitor(k=5)]), run([])
    for (name, a), b in zip(with_monitor.state_dict().items(), without.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=name)


def test_monitor_on_the_embedding_uses_the_normalised_query_encoder_output():
    model = tiny_moco()
    seen = []
    project = model.project
    model.project = lambda x: seen.append(x.shape[0]) or project(x)
    monitor = KNNMonitor(features="embedding", k=5)
    trainer = tiny_trainer(max_epochs=1, callbacks=[monitor], limit_train_batches=1)
    trainer.fit(model, datamodule=BlobsDataModule())
    assert sum(seen) == 64 + 32  # the memory bank and the queries went through project()
    assert 0.0 <= monitor.last["top1"] <= 1.0
    with pytest.raises(ValueError, match="features=.* must be one of"):
        KNNMonitor(features="head")


def test_monitor_without_eval_loaders_is_a_clear_error():
    class NoEvalDM:
        pass

    class FakeTrainer:
        datamodule = NoEvalDM()

    with pytest.raises(RuntimeError, match="eval_train_dataloader"):
        KNNMonitor().compute(FakeTrainer(), tiny_moco())
