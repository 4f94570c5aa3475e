"""Write the stage bundle (trainable weights + resolved config) when a stage finishes."""
from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from nextgpt.bundles import bundle_state_dict, save_bundle


class StageBundle(L.Callback):
    """At the end of a completed fit, write ``directory`` and retire ``last.ckpt``.

    Retiring the finished run's ``last.ckpt`` means ``resume=true`` only ever resumes an
    interrupted run, never a completed one.
    """

    def __init__(self, directory: str):
        self.directory = Path(directory)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.interrupted:
            return
        # every rank takes part in gathering sharded tensors (FSDP2 / ZeRO-3); global rank 0 writes
        state = bundle_state_dict(pl_module.model, pl_module.bundle_names)
        if trainer.is_global_zero:
            meta = {
                "stage": pl_module.stage,
                "global_step": trainer.global_step,
                "init_from": pl_module.init_from,
                "trainable_groups": list(pl_module.trainable_groups),
                "full_model_params": sum(p.numel() for p in pl_module.model.parameters()),
            }
            save_bundle(self.directory, None, pl_module.hparams.get("run_config") or {}, meta, state=state)
            rank_zero_info(f"stage {pl_module.stage}: bundle written to {self.directory}")
            for cb in trainer.checkpoint_callbacks:
                last = Path(getattr(cb, "dirpath", "") or "") / "last.ckpt"
                if last.exists():  # a file, or a sharded checkpoint's folder
                    last.rename(last.with_name(f"finished-step{trainer.global_step:06d}.ckpt"))
        trainer.strategy.barrier()
