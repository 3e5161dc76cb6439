"""Weighted k-nearest-neighbour classification of frozen features: the metric, an offline helper, a callback.

The classifier is the one of InstDisc (Wu et al. 2018, Sec. 3.4) used by the official MoCo CIFAR-10 demo: on
L2-normalised features, each of the ``k`` most cosine-similar memory-bank samples votes for its label with
weight ``exp(sim / t)``; the class with the largest summed weight wins (defaults k=200, t=0.1 as in both).

Under ``torch.distributed`` the memory bank is sharded: each process keeps its part of the train set, finds every
(gathered) query's ``k`` nearest neighbours in it, and the candidates are merged into the global top ``k``: the
single-process result, on every process.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics.classification import MulticlassAccuracy

from moco_lightning import distributed
from moco_lightning.data.base import DatasetError
from moco_lightning.eval.cadence import is_monitor_epoch
from moco_lightning.eval.features import extract_features, has_labels, monitor_pass

#: What the kNN monitor embeds: the query backbone's features (``embed``) or the normalised query-encoder output
#: (``project``, the 128-d embedding of the official CIFAR-10 demo's monitor).
FEATURES = ("backbone", "embedding")


#: InstDisc / official MoCo CIFAR-10 demo values.
DEFAULT_K = 200
DEFAULT_TEMPERATURE = 0.1


@torch.no_grad()
def weighted_knn_predict(
    query_features: torch.Tensor,
    bank_features: torch.Tensor,
    bank_labels: torch.Tensor,
    num_classes: int,
    k: int = DEFAULT_K,
    temperature: float = DEFAULT_TEMPERATURE,
    chunk_size: int = 1024,
    bank_chunk_size: int | None = None,
    normalize: bool = True,
) -> torch.Tensor:
    """Class scores of weighted kNN: ``score[i, c] = sum of exp(s_ij / t)`` over the k nearest j of class c.

    Args:
        query_features: ``(N, D)`` features to classify.
        bank_features: ``(M, D)`` memory bank (labelled features); may be half precision to save memory.
        bank_labels: ``(M,)`` integer labels of the bank.
        num_classes: number of classes C.
        k: neighbours per query (clipped to M).
        temperature: t in ``exp(sim / t)``; small t lets the nearest neighbours dominate.
        chunk_size: queries per similarity block; memory is ``chunk_size x M`` (or ``x bank_chunk_size``).
        bank_chunk_size: if set, the bank is scanned in blocks of this size with a running top-k, so memory no
            longer grows with the bank.
        normalize: L2-normalise both sides first (set False if they already are).

    Returns:
        ``(N, C)`` float32 scores on the queries' device; ``argmax`` is the prediction.

    """
    if bank_features.shape[0] != bank_labels.shape[0]:
        raise ValueError(
            f"bank has {bank_features.shape[0]} features but {bank_labels.shape[0]} labels; "
            "pass one label per bank feature"
        )
    if k < 1 or temperature <= 0:
        raise ValueError(f"need k >= 1 and temperature > 0, got k={k}, temperature={temperature}")
    device = query_features.device
    bank = F.normalize(bank_features, dim=1) if normalize else bank_features
    bank_labels = bank_labels.to(bank.device, torch.long)
    sharded = distributed.is_distributed()
    if sharded:  # every process needs the same k: the global bank size
        k = min(k, int(distributed.concat_all_gather(torch.tensor([bank.shape[0]], device=bank.device)).sum()))
    else:
        k = min(k, bank.shape[0])
    scores = []
    for start in range(0, query_features.shape[0], chunk_size):
        q = query_features[start : start + chunk_size].to(bank.device, bank.dtype)
        if normalize:
            q = F.normalize(q, dim=1)
        top_sim, top_label = nearest_neighbours(q, bank, bank_labels, k, bank_chunk_size)
        if sharded:  # the candidates of every process's part of the bank, merged into the global top k
            top_sim, top_label = _merge_topk(distributed.concat_all_gather_dim(top_sim, dim=1),
                                             distributed.concat_all_gather_dim(top_label, dim=1), k)
        scores.append(vote(top_sim, top_label, num_classes, temperature).to(device))
    if not scores:
        return torch.zeros(0, num_classes, device=device)
    return torch.cat(scores)


def _merge_topk(sim: torch.Tensor, labels: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    sim, pick = sim.topk(k, dim=1)
    return sim, labels.gather(1, pick)


@torch.no_grad()
def nearest_neighbours(
    queries: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor, k: int, bank_chunk_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarities ``(N, k)`` (float32) and labels of each query's ``k`` most similar bank rows.

    Both sides must be normalised. A bank of fewer than ``k`` rows is padded with similarity ``-inf``.
    """
    top_sim = torch.full((queries.shape[0], k), float("-inf"), device=bank.device)
    top_label = torch.zeros((queries.shape[0], k), dtype=torch.long, device=bank.device)
    step = bank_chunk_size or max(bank.shape[0], 1)
    for b0 in range(0, bank.shape[0], step):
        sim = (queries @ bank[b0 : b0 + step].T).float()
        s, i = sim.topk(min(k, sim.shape[1]), dim=1)
        top_sim, top_label = _merge_topk(torch.cat([top_sim, s], 1), torch.cat([top_label, bank_labels[b0 + i]], 1), k)
    return top_sim, top_label


def vote(similarities: torch.Tensor, labels: torch.Tensor, num_classes: int, temperature: float) -> torch.Tensor:
    """Class scores ``(N, C)``: each neighbour adds ``exp(sim / t)`` to its label's score (``-inf`` adds 0)."""
    scores = torch.zeros(similarities.shape[0], num_classes, device=similarities.device, dtype=torch.float32)
    return scores.scatter_add_(1, labels, (similarities / temperature).exp())


def _resolve_bank_dtype(bank_dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    """``"auto"``/None: float16 on GPUs (half the memory), float32 on the CPU (fp16 matmul is slow there)."""
    if bank_dtype in (None, "auto"):
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(bank_dtype, str):
        dtype = getattr(torch, bank_dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"bank_dtype={bank_dtype!r} is not a torch dtype; use 'auto', 'float16' or 'float32'")
        return dtype
    return bank_dtype


@torch.no_grad()
def knn_accuracy(
    embed_fn: Callable[[torch.Tensor], torch.Tensor],
    train_loader: Iterable[Any],
    val_loader: Iterable[Any],
    num_classes: int | None = None,
    k: int = DEFAULT_K,
    temperature: float = DEFAULT_TEMPERATURE,
    device: torch.device | str | None = None,
    bank_dtype: torch.dtype | str | None = "auto",
    chunk_size: int = 256,
    bank_chunk_size: int | None = None,
) -> dict[str, float]:
    """Weighted-kNN accuracy of an encoder: the train set is the memory bank, the val set the queries.

    Args:
        embed_fn: maps an image batch to features, e.g. ``model.embed`` (put the model in eval mode first).
        train_loader: yields ``(x, y)``, e.g. ``datamodule.eval_train_dataloader()``.
        val_loader: yields ``(x, y)``, e.g. ``datamodule.eval_val_dataloader()``.
        num_classes: number of classes; inferred from the largest label if not given.
        k: neighbours per query (200 as in InstDisc and the MoCo demo).
        temperature: weight temperature (0.1 as in InstDisc and the MoCo demo).
        device: where images are sent before ``embed_fn`` (the model's device); None leaves them as they are.
        bank_dtype: dtype of the memory bank: "auto" = float16 on GPU, float32 on CPU.
        chunk_size: queries per similarity block.
        bank_chunk_size: bank samples per similarity block (None: the whole bank at once).

    Returns:
        ``{"top1": ..., "top5": ...}`` as fractions in [0, 1] (top-5 is top-min(5, C)), the same on every process.

    """
    bank, bank_labels = extract_features(embed_fn, train_loader, device, gather=False)  # this process's part
    queries, labels = extract_features(embed_fn, val_loader, device)  # all queries, on every process
    if num_classes is None:
        largest = torch.stack([bank_labels.max(), labels.max()]).max().reshape(1)
        num_classes = int(distributed.concat_all_gather(largest).max()) + 1
    bank = bank.to(_resolve_bank_dtype(bank_dtype, bank.device))
    scores = weighted_knn_predict(queries, bank, bank_labels, num_classes, k, temperature, chunk_size, bank_chunk_size)
    result = {}
    for name, top_k in (("top1", 1), ("top5", min(5, num_classes))):
        metric = MulticlassAccuracy(num_classes=num_classes, top_k=top_k, average="micro").to(scores.device)
        result[name] = float(metric(scores, labels.to(scores.device)))
    return result


class KNNMonitor(Callback):
    """Log weighted-kNN accuracy of the query encoder every ``every_n_epochs`` training epochs.

    At the end of an epoch, in eval mode, the eval train loader is the memory bank and the eval val loader the
    queries; ``{prefix}_top1`` / ``_top5`` (fractions) are logged, the same on every process.

    Args:
        every_n_epochs: run after epochs ``n-1, 2n-1, ...`` and always after the last one.
        features: ``"backbone"`` (``pl_module.embed``) or ``"embedding"`` (``pl_module.project``, as the official
            CIFAR-10 demo's monitor).
        k: neighbours that vote; temperature: of the votes' weights; bank_dtype, chunk_size, bank_chunk_size: as
            :func:`knn_accuracy` takes them.
        prefix: metric name prefix.
        at_start: also evaluate at initialisation on a fresh run: kept in :attr:`initial`, logged once as
            ``{prefix}_top1_init`` / ``{prefix}_top5_init``.

    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        features: str = "backbone",
        k: int = DEFAULT_K,
        temperature: float = DEFAULT_TEMPERATURE,
        bank_dtype: str = "auto",
        chunk_size: int = 256,
        bank_chunk_size: int | None = None,
        prefix: str = "val/knn",
        at_start: bool = False,
    ) -> None:
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs={every_n_epochs} must be >= 1; set every_n_epochs")
        if features not in FEATURES:
            raise ValueError(f"features={features!r} must be one of {FEATURES}; set features")
        self.every_n_epochs, self.features, self.prefix, self.at_start = every_n_epochs, features, prefix, at_start
        self.knn_kwargs = {"k": k, "temperature": temperature, "bank_dtype": bank_dtype, "chunk_size": chunk_size,
                           "bank_chunk_size": bank_chunk_size}
        self.last: dict[str, float] = {}
        self._told = False
        self.initial: dict[str, float] = {}  # kNN of the encoder at initialisation (with at_start)
        self.passes = 0  # kNN passes during training (of this process's run)
        self._initial_logged = False

    def compute(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Embed the datamodule's eval loaders with ``pl_module.embed`` in eval mode; return kNN accuracy."""
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "eval_train_dataloader") or not hasattr(dm, "eval_val_dataloader"):
            raise RuntimeError(
                "KNNMonitor needs a datamodule with eval_train_dataloader() and eval_val_dataloader() "
                "passed to trainer.fit(model, datamodule=...); remove the knn callback or use a "
                "moco_lightning.data datamodule"
            )
        method = "embed" if self.features == "backbone" else "project"
        if not hasattr(pl_module, method):
            raise RuntimeError(f"KNNMonitor(features={self.features!r}) needs pl_module.{method}(x); "
                               f"{type(pl_module).__name__} has none")
        distributed.broadcast_batchnorm_statistics(pl_module)  # one model on every process: rank 0's
        with monitor_pass(trainer, pl_module):
            return knn_accuracy(getattr(pl_module, method), dm.eval_train_dataloader(), dm.eval_val_dataloader(),
                                num_classes=getattr(dm, "num_classes", None), device=pl_module.device,
                                **self.knn_kwargs)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """With ``at_start``, evaluate the encoder at initialisation (a fresh run only: step 0)."""
        if not self.at_start or trainer.global_step != 0 or not has_labels(trainer.datamodule):
            return
        try:
            self.initial = self.compute(trainer, pl_module)
        except DatasetError:
            return  # said once by the first epoch's pass
        rank_zero_info(f"kNN monitor: the encoder at initialisation, {self.prefix}_top1 {self.initial['top1']:.4f}")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Run the kNN evaluation when due and log ``{prefix}_top1`` and ``{prefix}_top5``."""
        if not is_monitor_epoch(trainer, self.every_n_epochs):
            return
        if not has_labels(trainer.datamodule):
            return self._say_once("the images have no labels (no class folders):")
        try:
            self.last = self.compute(trainer, pl_module)
        except DatasetError as err:  # the data cannot be evaluated (no validation images...)
            return self._say_once(f"skipped ({err});")
        self.passes += 1
        if self.initial and not self._initial_logged:
            self._initial_logged = True
            for name, value in self.initial.items():
                pl_module.log(f"{self.prefix}_{name}_init", value, on_epoch=True, sync_dist=True)
        for name, value in self.last.items():
            # identical on every process (features are gathered); sync_dist only silences Lightning's DDP warning
            pl_module.log(f"{self.prefix}_{name}", value, on_epoch=True, prog_bar=name == "top1", sync_dist=True)


    def _say_once(self, why: str) -> None:
        if not self._told:
            self._told = True
            rank_zero_info(f"kNN monitor: {why} {self.prefix}_top1 is not computed")


def monitor_every_n_epochs(trainer: L.Trainer, every_n_epochs: int | None = None) -> int | None:
    """The cadence of an epoch-end monitor: ``every_n_epochs`` if given, else the kNN monitor's, else ``None``."""
    if every_n_epochs is not None:
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1 or None (the kNN monitor's), got {every_n_epochs}")
        return every_n_epochs
    for callback in trainer.callbacks:  # type: ignore[attr-defined]
        if isinstance(callback, KNNMonitor):
            return callback.every_n_epochs
    return None
