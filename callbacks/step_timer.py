"""Wall time of every optimizer step: logged as ``perf/step_seconds`` and ``perf/samples_per_second``,
and, with ``path``, written as JSON lines with the loss and (on CUDA) the peak memory so far
(benchmarks read them)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import lightning as L
import torch


class StepTimer(L.Callback):
    def __init__(self, path: str | None = None):
        self.path = Path(path) if path else None
        self._start: float | None = None
        self._samples = 0
        self._step = -1

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._start is None or trainer.global_step != self._step:  # the first micro-batch of a step
            self._start, self._samples, self._step = time.perf_counter(), 0, trainer.global_step
        self._samples += len(batch.get("keys", ())) if isinstance(batch, dict) else 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self._step:  # still accumulating
            return
        assert self._start is not None  # on_train_batch_start set it for this batch
        seconds = time.perf_counter() - self._start
        samples = self._samples * trainer.world_size  # the ranks' batches are equal in count
        pl_module.log_dict(
            {"perf/step_seconds": seconds, "perf/samples_per_second": samples / seconds},
            on_step=True,
            batch_size=1,
        )
        if self.path is not None and trainer.is_global_zero:
            row = {"step": self._step, "seconds": seconds, "samples": samples}
            loss = trainer.callback_metrics.get("train/loss")
            if loss is not None:
                row["loss"] = float(loss)
            if torch.cuda.is_available():
                row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        self._start = None
