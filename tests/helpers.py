"""Small Lightning callbacks the CLI tests inject through Hydra overrides."""

from __future__ import annotations

import lightning as L


class CrashAfter(L.Callback):
    """Simulate a crash (a killed job, a lost node) once ``step`` optimizer steps are done."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            raise RuntimeError(f"simulated crash after step {trainer.global_step}")


class RecordKeys(L.Callback):
    """Append the sample keys of every training batch to ``path`` (one line per batch:
    ``<global step> <key> <key> ...``). With several processes each writes its own file,
    ``<path>.rank<global rank>``."""

    def __init__(self, path: str):
        self.path = path

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch is not None:
            path = f"{self.path}.rank{trainer.global_rank}" if trainer.world_size > 1 else self.path
            with open(path, "a") as f:
                f.write(f"{trainer.global_step} " + " ".join(batch["keys"]) + "\n")
