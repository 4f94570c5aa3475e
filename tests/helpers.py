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
