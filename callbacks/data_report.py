"""What the run read and skipped, over the whole run, and the limit on bad data.

Every training batch's skips are counted (not only those of logged steps), with the entries the
data module dropped before training (unreadable JSON entries, media missing when the shards were
written). The running totals are logged each step (``data/skipped``, ``data/skipped/<reason>``,
``data/truncated``), so any logged step shows the run so far. More than ``max_skip_fraction`` of
the samples bad stops the run, all ranks together (one all-reduce of two numbers a step): after
``min_samples`` samples, and at the end of every epoch whatever the data set's size. At the end the
report, per reason, summed over the ranks, goes to the log and to ``path`` (the run folder).

What is counted, once each: a sample the training step would have received but could not use
(the batch's ``num_skipped``: counted where the batch is delivered, so a sample that dataloader
workers read ahead and read again later counts once), and an entry dropped before training (once,
however many ranks read the files; checked at the start against all the entries). Counts are of
reads: a sample bad in every pass is skipped, and counted, once per pass that reaches it (``epochs``
says how many this run started), against the samples read in those passes.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import TypedDict

import lightning as L
import torch

from nextgpt.runs import RunError

log = logging.getLogger(__name__)


class TooMuchBadData(RunError):
    """More than ``max_skip_fraction`` of the samples were unusable: likely broken data, not bad luck."""


class Summary(TypedDict, total=False):
    """What :class:`DataReport` writes at the end of training (``path``, JSON) and logs."""

    samples: int  # read, over all ranks (and dropped before training)
    skipped: int
    skipped_by_reason: dict[str, int]
    media_from_cache: int  # input media items served by the ImageBind feature cache
    media_decoded: int  # ... decoded and encoded by the model
    truncated_on_rank0: int
    max_skip_fraction: float
    epochs: int


class DataReport(L.Callback):
    def __init__(
        self,
        max_skip_fraction: float = 0.1,
        min_samples: int = 20,
        path: str | None = None,
        dataset: str = "the data set",
    ):
        if not 0.0 <= float(max_skip_fraction) <= 1.0:
            raise ValueError(f"max_skip_fraction must be in [0, 1], got {max_skip_fraction}")
        self.max_skip_fraction, self.min_samples = float(max_skip_fraction), int(min_samples)
        self.path = Path(path) if path else None
        self.dataset = dataset
        self.reasons: Counter = Counter()  # this rank's skips by reason
        self.seen = self.skipped = self.truncated = 0  # this rank's counts
        self.from_cache = self.decoded = (
            0  # input media items: cached ImageBind features / decoded and encoded
        )
        self.before: Counter = Counter()  # dropped before training (the data module's own count)
        self.before_total = 0
        self.totals = (0, 0)  # (seen, skipped) over all ranks, as of the last step
        self.epochs = 0  # training epochs (passes) this run started

    # --- counting ---------------------------------------------------------------------------
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dm = getattr(trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "skipped_before_training"):
            self.before, self.before_total = dm.skipped_before_training()
        dropped = sum(self.before.values())
        if self.before_total and dropped > self.max_skip_fraction * self.before_total:
            self._fail(dropped, self.before_total, self.before, "before training")

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.epochs += 1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not isinstance(batch, dict):
            return
        skipped = int(batch.get("num_skipped", 0))
        self.seen += len(batch.get("keys", ())) + skipped
        self.skipped += skipped
        self.reasons.update(
            batch.get("skipped_by_reason") or ({"unusable sample": skipped} if skipped else {})
        )
        self.truncated += int(batch.get("num_truncated", 0))
        self.from_cache += int(batch.get("media_from_cache", 0))
        self.decoded += int(batch.get("media_decoded", 0))
        seen, bad = self._global(trainer)
        pl_module.log_dict(
            {"data/skipped": float(bad), "data/truncated": float(self.truncated)},
            on_step=True,
            batch_size=1,
            rank_zero_only=True,
        )
        if seen >= self.min_samples:
            self._check(trainer, seen, bad)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check(trainer, *self.totals)  # small data sets: the whole epoch, whatever its size

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        report = self.report(trainer)
        if trainer.is_global_zero:
            log.info("data: %s", self.describe(report))
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.path.write_text(json.dumps(report, indent=2) + "\n")

    # --- totals over ranks ------------------------------------------------------------------
    def _global(self, trainer: L.Trainer) -> tuple[int, int]:
        values = torch.tensor(
            [self.seen, self.skipped], dtype=torch.float64, device=trainer.strategy.root_device
        )
        if trainer.world_size > 1:
            values = trainer.strategy.reduce(values, reduce_op="sum")
        before = sum(self.before.values())
        self.totals = (int(values[0]) + before, int(values[1]) + before)
        return self.totals

    def _reasons(self, trainer: L.Trainer) -> Counter:
        total = Counter(self.reasons)
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            parts: list = [None] * trainer.world_size
            torch.distributed.all_gather_object(parts, dict(self.reasons))
            total = sum((Counter(p) for p in parts), Counter())
        return total + self.before

    def report(self, trainer: L.Trainer) -> Summary:
        """Every rank must call this (it gathers the ranks' reasons)."""
        seen, bad = self._global(trainer)
        media = torch.tensor(
            [self.from_cache, self.decoded], dtype=torch.float64, device=trainer.strategy.root_device
        )
        if trainer.world_size > 1:
            media = trainer.strategy.reduce(media, reduce_op="sum")
        return {
            "samples": seen,
            "skipped": bad,
            "skipped_by_reason": dict(self._reasons(trainer)),
            "media_from_cache": int(media[0]),
            "media_decoded": int(media[1]),
            "truncated_on_rank0": self.truncated,
            "max_skip_fraction": self.max_skip_fraction,
            "epochs": self.epochs,
        }

    @staticmethod
    def describe(report: Summary) -> str:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(report["skipped_by_reason"].items())) or "none"
        passes = report.get("epochs", 1)
        over = f"; over {passes} epochs (a sample bad in each is skipped in each)" if passes > 1 else ""
        return (
            f"{report['samples']} samples read, {report['skipped']} skipped ({reasons}); input media: "
            f"{report['media_from_cache']} from the feature cache, {report['media_decoded']} decoded" + over
        )

    def summary(self) -> str:
        """What this rank knows (for messages after training: no collectives)."""
        seen, bad = self.totals
        reasons = (
            ", ".join(f"{k}: {v}" for k, v in sorted((self.reasons + self.before).items())) or "none skipped"
        )
        return f"{seen} samples read, {bad} skipped ({reasons})"

    def _check(self, trainer: L.Trainer, seen: int, bad: int) -> None:
        if seen and bad > self.max_skip_fraction * seen:
            self._fail(bad, seen, self._reasons(trainer), "while training")

    def _fail(self, bad: int, seen: int, reasons: Counter, when: str) -> None:
        detail = ", ".join(f"{k}: {v}" for k, v in sorted(reasons.items()))
        raise TooMuchBadData(
            f"dataset {self.dataset!r}: {bad} of {seen} samples were unusable {when} "
            f"({bad / seen:.0%} > dataset.max_skip_fraction="
            f"{self.max_skip_fraction}); by reason: {detail}. Fix the data set (the log names each sample) or raise "
            "dataset.max_skip_fraction"
        )
