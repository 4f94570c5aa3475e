"""Write the stage bundle (trainable weights + resolved config) when a stage finishes."""

from __future__ import annotations

from pathlib import Path
from typing import cast

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from nextgpt.bundles import BundleMeta, bundle_identity, bundle_state_dict, save_bundle
from nextgpt.stages import NextGPTStage


class StageBundle(L.Callback):
    """At the end of a completed fit that trained at least one step, write ``directory``.

    A run that was interrupted, or trained nothing (all steps done before a resume, no data), writes
    no bundle: an earlier, good bundle is never replaced by an untrained one. An existing bundle is
    kept as a version beside the new one (``save_bundle``).
    """

    def __init__(self, directory: str):
        self.directory = Path(directory)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.interrupted:
            return
        stage = cast(NextGPTStage, pl_module)  # the stages are the only modules trained with this callback
        trained = trainer.global_step - getattr(pl_module, "start_step", 0)
        if trained <= 0:
            rank_zero_info(
                f"stage {stage.stage}: trained no step in this run; {self.directory} is left as it is"
            )
            return
        model = stage.model
        assert model is not None  # configure_model built it before the first step
        # every rank takes part in gathering sharded tensors (FSDP2 / ZeRO-3); global rank 0 writes
        state = bundle_state_dict(model, stage.bundle_names)
        # trained old vocabulary rows (model.vocab_rows=all), else an imported bundle's own rows
        base_rows = (
            model.vocab_rows_state()
            if "vocab_rows" in stage.trainable_groups
            else getattr(model, "base_rows", None)
        )
        if trainer.is_global_zero:
            config = stage.hparams.get("run_config") or {}
            meta: BundleMeta = {
                "stage": stage.stage,
                "global_step": trainer.global_step,
                "trained_steps": trained,
                "run": (config.get("run") or {}).get("key"),
                "init_from": stage.init_from,
                "trainable_groups": list(stage.trainable_groups),
                "full_model_params": sum(p.numel() for p in model.parameters()),
                **bundle_identity(model, stage.model_spec),
            }
            save_bundle(self.directory, None, config, meta, state=state, base_rows=base_rows)
            rank_zero_info(f"stage {stage.stage}: bundle written to {self.directory}")
        trainer.strategy.barrier()
