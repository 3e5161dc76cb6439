"""Warn, once and in one line, when a MoCo run looks wrong: what was seen, what it usually means, what to change.

:class:`HealthMonitor` reads values the run computes anyway (the step's loss, logits and queries, the queue's
write stamps, the kNN monitor's results, the diagnostics' ``val/uniformity``), only at Lightning's logging steps
(every ``trainer.log_every_n_steps`` optimizer steps, where the host reads the logged values anyway) and at epoch
ends. It never stops a run and warns at most once per kind, on global rank 0 only. The checks (``not-learning``,
``collapse``, ``leak``, ``knn-below-init``, ``key-encoder-too-fast``, ``not-finite``), what each one's warning means
and what to change are in docs/is-my-run-healthy.md; their thresholds are :class:`HealthMonitor`'s arguments.
The default thresholds come from measured runs (benchmarks/RESULTS.md, "Health monitor thresholds").
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn

from moco_lightning.nonfinite import NonFiniteLossError

__all__ = ["HealthMonitor", "HealthWarning", "chance_loss"]

#: What every warning of the monitor starts with.
PREFIX = "MoCo health"


class HealthWarning(UserWarning):
    """A warning of :class:`HealthMonitor` (filter it with ``warnings.filterwarnings``)."""


def chance_loss(pl_module: L.LightningModule, outputs: Mapping[str, Any], processes: int = 1) -> float | None:
    """The loss of an encoder that cannot tell the positive from the negatives, or ``None`` when unknown.

    From the width of the step's ``logits`` (``1 + K`` columns for MoCo v1/v2): ``ln(width)``, doubled for the
    symmetric loss (two directions summed). Without logits, a module with a ``predictor`` (MoCo v3:
    ``2T · CE`` in each of two directions over the keys of the global batch, ``processes`` x the rows of ``q``)
    is at ``4T · ln(global batch)``.
    """
    logits = outputs.get("logits")
    hparams = getattr(pl_module, "hparams", {})
    if isinstance(logits, torch.Tensor) and logits.ndim == 2 and logits.shape[1] > 1:
        return math.log(logits.shape[1]) * (2.0 if hparams.get("symmetric", False) else 1.0)
    temperature = getattr(pl_module, "T", None)
    q = outputs.get("q")
    if hasattr(pl_module, "predictor") and temperature is not None and isinstance(q, torch.Tensor):
        batch = q.shape[0] * processes
        return 4.0 * float(temperature) * math.log(batch) if batch > 1 else None
    return None


class HealthMonitor(Callback):
    """Warn once per kind when the run shows a common MoCo failure; never stops the run.

    Args:
        enabled: ``False`` turns every check off.
        window: logging steps averaged by the step checks (loss, accuracy, spread of the queries).
        after_steps: steps before the loss and collapse checks; ``None``: the later of the warm-up's end and
            ``after_fraction`` of the run's steps.
        after_fraction: with ``after_steps=None``, the fraction of the run's optimizer steps the loss and collapse
            checks wait for (the digits default is at 0.99 of chance at step 50 of 660 and its val/uniformity near 0
            for 2 epochs before both fall: benchmarks/RESULTS.md, "Health monitor thresholds").
        chance_fraction: ``not-learning`` when the mean loss after ``after_steps`` is at least this fraction of chance.
        collapse_std: ``collapse`` when the normalised queries' mean per-dimension std x ``sqrt(dim)`` is below this.
        collapse_uniformity: ``collapse`` when ``val/uniformity`` (≤ 0; 0 = every embedding at one point) is above this.
        leak_accuracy: ``leak`` when the mean pretext top-1 after the queue's first turnover is at least this.
        knn_patience: kNN passes after which kNN top-1 below the encoder at initialisation is ``knn-below-init``.
        knn_after_fraction: and not before this fraction of ``max_epochs`` (healthy runs dip below their init
            first: the digits default for its first 5 of 30 epochs, Fashion-MNIST at 16 px for 5 of 6).
        knn_margin: how far (a fraction) below initialisation counts as below.
        max_key_age: ``key-encoder-too-fast`` when the oldest key's age in steps x ``1 - m`` is above this.

    """

    def __init__(
        self,
        enabled: bool = True,
        window: int = 5,
        after_steps: int | None = None,
        after_fraction: float = 0.25,
        # FMNIST: healthy at 0.58 of ln(K+1) after the warm-up, 0.86-0.92 after one epoch; m=0 at 1.00 (RESULTS.md)
        chance_fraction: float = 0.95,
        # digits 8 px: 0.07-0.20 at init and while healthy; lr 20 (collapsed) 0.025-0.029 (RESULTS.md)
        collapse_std: float = 0.05,
        # FMNIST: healthy val/uniformity -1.6 .. -2.1 from epoch 0; m=0 at -0.0 and -0.38 (RESULTS.md)
        collapse_uniformity: float = -0.5,
        leak_accuracy: float = 0.95,
        knn_patience: int = 3,
        knn_after_fraction: float = 0.5,
        knn_margin: float = 0.0,
        # He et al. 2019 Sec. 4.1 (K 4,096, batch 256: keys up to 16 steps old): m 0.9 (1.6 time constants) 55.2 %
        # against 59.0 at m 0.999 (0.016); FMNIST, same K: m 0.9 74.5 kNN, below init 76.8 (RESULTS.md)
        max_key_age: float = 1.0,
    ) -> None:
        if window < 1:
            raise ValueError(f"window={window} must be a positive number of logging steps")
        if after_steps is not None and after_steps < 0:
            raise ValueError(f"after_steps={after_steps} must be >= 0 or None (the end of the warm-up)")
        if knn_patience < 1:
            raise ValueError(f"knn_patience={knn_patience} must be a positive number of kNN passes")
        if not 0 <= after_fraction <= 1:
            raise ValueError(f"after_fraction={after_fraction} must be in [0, 1]")
        self.enabled, self.window, self.after_steps, self.leak_accuracy = enabled, window, after_steps, leak_accuracy
        self.after_fraction = after_fraction
        self.chance_fraction, self.collapse_std, self.max_key_age = chance_fraction, collapse_std, max_key_age
        self.collapse_uniformity = collapse_uniformity
        self.knn_patience, self.knn_after_fraction, self.knn_margin = knn_patience, knn_after_fraction, knn_margin
        self.warned: set[str] = set()
        self._last_step = -1
        self._losses: deque[float] = deque(maxlen=window)
        self._spreads: deque[float] = deque(maxlen=window)
        self._accuracies: deque[float] = deque(maxlen=window)

    # ---------------------------------------------------------------- the one voice
    def warn(self, kind: str, step: int, saw: str, means: str, change: str) -> None:
        """Warn ``kind`` once (rank 0 only): ``MoCo health [kind] at step N: saw; usually: means; try: change``."""
        if kind in self.warned:
            return
        self.warned.add(kind)
        rank_zero_warn(f"{PREFIX} [{kind}] at step {step}: {saw}; usually: {means}; try: {change}",
                       category=HealthWarning)

    # ---------------------------------------------------------------- at the logging steps
    def _warmed_up(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> bool:
        if self.after_steps is not None:
            return step >= self.after_steps
        warmup_epochs = float(getattr(pl_module, "hparams", {}).get("warmup_epochs", 0) or 0)
        steps_per_epoch = int(trainer.num_training_batches) // max(int(trainer.accumulate_grad_batches), 1)
        total = float(trainer.estimated_stepping_batches)
        start = max(warmup_epochs * steps_per_epoch, self.after_fraction * total if math.isfinite(total) else 0.0)
        return step >= start

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """At the logging steps: the lr, the loss against chance, the queries' spread, the accuracy, the key ages."""
        step, every = trainer.global_step, int(trainer.log_every_n_steps or 0)
        # global_step moves once per optimizer step: a repeated value is a micro-batch of gradient accumulation
        if (not self.enabled or not trainer.is_global_zero or every < 1 or step == 0 or step == self._last_step
                or step % every != 0 or not isinstance(outputs, Mapping)):
            return
        self._last_step = step
        lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else None
        if lr is not None and not math.isfinite(float(lr)):
            self.warn("not-finite", step, f"the lr is {float(lr)}", "a schedule or scaling that divides by zero",
                      "a finite lr and lr schedule (the loss will turn NaN next)")
        values = self._step_values(pl_module, outputs, step)
        queue_full = values.get("oldest_written", 1.0) > 0  # slot stamps: 0 = a random initial key
        if queue_full and "oldest_written" in values:
            self._check_key_age(pl_module, step, step - values["oldest_written"])
        if queue_full and "accuracy" in values:
            self._accuracies.append(values["accuracy"])
            self._check_leak(pl_module, step)
        if not (queue_full and self._warmed_up(trainer, pl_module, step)):
            return
        chance = chance_loss(pl_module, outputs, trainer.world_size)
        if chance is not None and "loss" in values and math.isfinite(values["loss"]):
            self._losses.append(values["loss"])
            self._check_chance(step, chance)
        if "spread" in values:
            self._spreads.append(values["spread"])
            self._check_spread(step, int(values["dim"]))

    def _step_values(self, pl_module: L.LightningModule, outputs: Mapping[str, Any], step: int) -> dict[str, float]:
        """The step's numbers, read from the device in one transfer."""
        names, tensors = [], []
        with torch.no_grad():
            loss = outputs.get("loss")
            if isinstance(loss, torch.Tensor):
                names.append("loss")
                tensors.append(loss.detach().float().reshape(()))
            logits = outputs.get("logits")
            if isinstance(logits, torch.Tensor) and logits.ndim == 2:  # the positive in column 0 (v1/v2)
                names.append("accuracy")
                tensors.append((logits.argmax(dim=1) == 0).float().mean())
            q = outputs.get("q")
            if isinstance(q, torch.Tensor) and q.ndim == 2 and q.shape[0] > 1:
                names.append("spread")
                tensors.append(F.normalize(q.detach().float(), dim=1).std(dim=0).mean() * math.sqrt(q.shape[1]))
            written_at = getattr(getattr(pl_module, "key_queue", None), "written_at", None)
            if isinstance(written_at, torch.Tensor):
                names.append("oldest_written")
                tensors.append(written_at.min().float())
            if not tensors:
                return {}
            read = torch.stack([t.to(tensors[0].device) for t in tensors]).tolist()  # the one host read
        values = dict(zip(names, read, strict=True))
        if isinstance(q, torch.Tensor) and "spread" in values:
            values["dim"] = float(q.shape[1])
        return values

    def _check_chance(self, step: int, chance: float) -> None:
        if len(self._losses) < self.window:
            return
        mean = sum(self._losses) / len(self._losses)
        if mean >= self.chance_fraction * chance:
            self.warn("not-learning", step,
                      f"the loss averaged {mean:.3f} over the last {len(self._losses)} logging steps after the "
                      f"warm-up, {mean / chance:.0%} of chance ({chance:.3f} = ln of the logits' width)",
                      "the encoder is not learning to tell the positive key from the negatives",
                      "another lr (often lower, or a longer warm-up), a smaller temperature T, a larger momentum m")

    def _check_spread(self, step: int, dim: int) -> None:
        if len(self._spreads) < self.window:
            return
        mean = sum(self._spreads) / len(self._spreads)
        if mean < self.collapse_std:
            self.warn("collapse", step,
                      f"the normalised queries' per-dimension std is {mean / math.sqrt(dim):.4f}, {mean:.2f} x "
                      f"1/sqrt(dim) (dim {dim}; about 1 when spread over the sphere)",
                      "the embeddings collapse towards one point, often after a too high lr",
                      "a lower lr or a longer warm-up, a larger momentum m")

    def _check_leak(self, pl_module: L.LightningModule, step: int) -> None:
        if len(self._accuracies) < self.window:
            return
        mean = sum(self._accuracies) / len(self._accuracies)
        if mean >= self.leak_accuracy:
            mode = getattr(pl_module, "bn_mode", None)
            self.warn("leak", step,
                      f"the pretext top-1 averaged {mean:.1%} over the last {len(self._accuracies)} logging steps "
                      f"after the queue's random initial keys were all replaced (BN mode {mode})",
                      "the query finds its key by a shortcut: BatchNorm statistics shared by a query and its key, "
                      "or views too alike",
                      "bn 'shuffle' (several processes) or 'split' (one device), stronger augmentation")

    def _check_key_age(self, pl_module: L.LightningModule, step: int, oldest: float) -> None:
        momentum = getattr(pl_module, "current_momentum", getattr(pl_module, "m", None))
        if momentum is None or "key-encoder-too-fast" in self.warned:
            return
        momentum = float(momentum)
        constants = oldest * (1.0 - momentum)
        if constants > self.max_key_age:
            time_constant = math.inf if momentum >= 1 else 1.0 / (1.0 - momentum)
            self.warn("key-encoder-too-fast", step,
                      f"the oldest key of the queue is {oldest:.0f} steps old, {constants:.1f} time constants "
                      f"1/(1-m) = {time_constant:.3g} of the key encoder (m {momentum:g})",
                      "the queue mixes keys from key encoders too different to compare (m = 0: every key from "
                      "another encoder)",
                      "a larger momentum m (e.g. 0.99 or 0.999) or a smaller queue_size")

    # ---------------------------------------------------------------- at epoch ends
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Check the previous epoch's kNN and uniformity (logged at its end, so order of callbacks does not matter)."""
        if trainer.current_epoch > 0:
            self._epoch_checks(trainer, pl_module, at_end=False)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Check the last epoch's kNN and uniformity."""
        self._epoch_checks(trainer, pl_module, at_end=True)

    def _epoch_checks(self, trainer: L.Trainer, pl_module: L.LightningModule, at_end: bool) -> None:
        if not self.enabled or not trainer.is_global_zero:
            return
        step = trainer.global_step
        uniformity = trainer.callback_metrics.get("val/uniformity")
        if (uniformity is not None and self._warmed_up(trainer, pl_module, step)
                and float(uniformity) > self.collapse_uniformity):
            self.warn("collapse", step,
                      f"val/uniformity is {float(uniformity):.3f} (0 = every embedding at one point; spread "
                      "embeddings reach -2 or lower)",
                      "the embeddings collapse towards one point, often after a too high lr",
                      "a lower lr or a longer warm-up, a larger momentum m")
        knn = next((cb for cb in trainer.callbacks if hasattr(cb, "initial") and hasattr(cb, "passes")), None)
        if knn is None or not knn.initial or knn.passes < self.knn_patience or "top1" not in knn.last:
            return
        if not at_end and trainer.current_epoch < self.knn_after_fraction * max(trainer.max_epochs or 0, 0):
            return
        initial, now = knn.initial["top1"], knn.last["top1"]
        if now < initial - self.knn_margin:
            self.warn("knn-below-init", step,
                      f"kNN top-1 is {now:.2%} after {knn.passes} kNN passes, below the {initial:.2%} of the "
                      "encoder at initialisation",
                      "training is destroying the features a random network has (a run too short, or not learning)",
                      "train longer, then check the loss against chance, the lr, momentum m and queue_size")

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """Say once, in the monitor's voice, that the non-finite loss guard stopped the run (it stops, not this)."""
        if not self.enabled or not isinstance(exception, NonFiniteLossError):
            return
        lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else None
        shown = "" if lr is None else f" (lr {float(lr):.4g})"
        self.warn("not-finite", trainer.global_step,
                  f"the non-finite loss guard stopped the run{shown}: {str(exception).split(';')[0]}",
                  "an lr too high for the batch, or a non-finite lr or input",
                  "a lower lr or a longer warm-up, then resume from the newest checkpoint")

    def state_dict(self) -> dict[str, Any]:
        """The kinds already warned about: a resumed run does not repeat them."""
        return {"warned": sorted(self.warned)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the kinds already warned about."""
        self.warned = set(state_dict.get("warned", []))
