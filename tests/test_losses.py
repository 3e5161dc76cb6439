import math

import torch
from torch.nn import functional as F

from moco_lightning.losses import (
    batch_contrastive_logits,
    batch_positive_accuracy,
    info_nce_logits,
    info_nce_loss,
    moco_v3_loss,
    positive_rank_accuracy,
)


def reference_info_nce(q, k, queue, t):
    """Per-sample InfoNCE, written from Eq. 1 of the paper in float64 with Python loops."""
    total = 0.0
    for i in range(q.shape[0]):
        pos = math.exp(float(q[i] @ k[i]) / t)
        negs = sum(math.exp(float(q[i] @ queue[j]) / t) for j in range(queue.shape[0]))
        total += -math.log(pos / (pos + negs))
    return total / q.shape[0]


def test_loss_equals_float64_reference():
    q = F.normalize(torch.randn(6, 8, dtype=torch.float64), dim=1)
    k = F.normalize(torch.randn(6, 8, dtype=torch.float64), dim=1)
    queue = F.normalize(torch.randn(10, 8, dtype=torch.float64), dim=1)
    logits, labels = info_nce_logits(q, k, queue, temperature=0.07)
    assert abs(info_nce_loss(logits, labels).item() - reference_info_nce(q, k, queue, 0.07)) < 1e-9


def test_logits_layout_positive_first_and_divided_by_t():
    q = F.normalize(torch.randn(4, 5), dim=1)
    k = F.normalize(torch.randn(4, 5), dim=1)
    queue = F.normalize(torch.randn(7, 5), dim=1)
    logits, labels = info_nce_logits(q, k, queue, temperature=0.2)
    assert logits.shape == (4, 8)
    assert torch.equal(labels, torch.zeros(4, dtype=torch.long))
    torch.testing.assert_close(logits[:, 0], (q * k).sum(1) / 0.2)
    torch.testing.assert_close(logits[:, 1:], q @ queue.t() / 0.2)


def test_loss_is_low_when_positive_dominates():
    q = F.normalize(torch.randn(1, 16), dim=1)
    queue = -q.repeat(3, 1)  # every negative points the other way
    logits, labels = info_nce_logits(q, q.clone(), queue, temperature=0.07)
    assert info_nce_loss(logits, labels).item() < 1e-6


def reference_moco_v3_loss(q, k_all, t, offset):
    """MoCo v3's loss of one direction from its formula in float64 loops: 2T · mean_i −log softmax_j(q̂_i·k̂_j / T)
    at j = i + offset."""
    total = 0.0
    for i in range(q.shape[0]):
        qi = q[i] / math.sqrt(float(q[i] @ q[i]))
        logits = [float(qi @ k) / math.sqrt(float(k @ k)) / t for k in k_all]
        total += -(logits[i + offset] - math.log(sum(math.exp(x) for x in logits)))
    return 2 * t * total / q.shape[0]


def test_v3_loss_equals_float64_reference_on_one_process():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(5, 6, generator=g, dtype=torch.float64), torch.randn(5, 6, generator=g, dtype=torch.float64)
    for t in (0.2, 1.0):  # the ViT and the ResNet temperatures
        assert abs(moco_v3_loss(q, k, t).item() - reference_moco_v3_loss(q, k, t, offset=0)) < 1e-9


def test_v3_logits_normalise_both_sides_and_label_each_query_with_its_own_key():
    q, k = 3 * torch.randn(4, 5), 7 * torch.randn(4, 5)
    logits, labels = batch_contrastive_logits(q, k, 0.5)
    torch.testing.assert_close(logits, F.normalize(q, dim=1) @ F.normalize(k, dim=1).t() / 0.5)
    assert torch.equal(labels, torch.arange(4))


def test_v3_loss_gradient_flows_to_queries_only():
    q, k = torch.randn(4, 5, requires_grad=True), torch.randn(4, 5, requires_grad=True)
    moco_v3_loss(q, k, 1.0).backward()
    assert q.grad is not None and k.grad is None  # keys are targets, gathered without gradient


def test_logits_stay_float32_under_bf16_autocast():
    q = F.normalize(torch.randn(4, 8), dim=1)
    k = F.normalize(torch.randn(4, 8), dim=1)
    queue = F.normalize(torch.randn(16, 8), dim=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, _ = info_nce_logits(q.bfloat16(), k.bfloat16(), queue, temperature=0.07)
        half = (q.bfloat16() @ queue.bfloat16().t()) / 0.07  # what autocast alone would give
    assert logits.dtype == torch.float32 and half.dtype == torch.bfloat16
    exact = q.bfloat16().float() @ queue.t() / 0.07
    torch.testing.assert_close(logits[:, 1:], exact, atol=1e-5, rtol=1e-5)
    assert (half.float() - exact).abs().max() > 1e-3  # bf16 logits would be off by this much


def test_positive_rank_accuracy_counts_negatives_above_the_positive():
    logits = torch.tensor([[5.0, 1.0, 2.0, 3.0],    # positive first: rank 0
                           [2.0, 3.0, 1.0, 0.0],    # one negative above: rank 1
                           [0.0, 1.0, 2.0, 3.0]])   # three above: rank 3
    top1, top2, top4 = positive_rank_accuracy(logits, (1, 2, 4))
    torch.testing.assert_close(torch.stack([top1, top2, top4]), torch.tensor([1 / 3, 2 / 3, 1.0]))


def test_batch_positive_accuracy_counts_the_queries_whose_nearest_key_is_their_own_view():
    keys = F.normalize(torch.randn(6, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    queries = 3.0 * keys  # the norm of a query does not change its nearest key
    queries[[1, 4]] = keys[[2, 0]]  # two queries sit on another image's key
    torch.testing.assert_close(batch_positive_accuracy(queries, keys), torch.tensor(4 / 6))


def test_v3_logits_stay_float32_under_bf16_autocast():
    q, k = torch.randn(4, 8), torch.randn(4, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, _ = batch_contrastive_logits(q.bfloat16(), k.bfloat16(), 0.2)
    assert logits.dtype == torch.float32
    exact = F.normalize(q.bfloat16().float(), dim=1) @ F.normalize(k.bfloat16().float(), dim=1).t() / 0.2
    torch.testing.assert_close(logits, exact, atol=1e-5, rtol=1e-5)
