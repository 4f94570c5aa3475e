"""Print and log trainable / frozen parameter counts when a fit starts."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.utilities import rank_zero_info


class ParamCounts(L.Callback):
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainable = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
        frozen = sum(p.numel() for p in pl_module.parameters() if not p.requires_grad)
        total = trainable + frozen
        rank_zero_info(
            f"parameters: trainable {trainable:,} ({100 * trainable / max(total, 1):.3f}%), frozen "
            f"{frozen:,}, total {total:,}"
        )
        for logger in trainer.loggers:
            logger.log_hyperparams({"params/trainable": trainable, "params/frozen": frozen})
