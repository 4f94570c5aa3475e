"""Generate from fixed prompts (and media) during training and log what came out.

With a W&B logger the samples go into a ``samples`` table (prompt, answer, signal groups, and the
images, audio and video as media); with any logger they are also written as files under
``<dir>/step<N>/`` with a ``samples.jsonl`` line per prompt, and the number of signal groups
emitted is logged as a metric, so CSV and TensorBoard runs can follow it too.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger

from nextgpt.generate import Generator
from nextgpt.model import load_conditioners
from nextgpt.stages import NextGPTStage
from nextgpt.strategies import is_sharded

log = logging.getLogger(__name__)


class GenerationSamples(L.Callback):
    def __init__(
        self,
        prompts: Sequence[Any],
        directory: str,
        every_n_steps: int = 0,
        every_n_validations: int = 0,
        max_new_tokens: int = 48,
        seed: int = 0,
    ):
        """``prompts``: strings, or ``{"prompt": str, "media": [paths]}``. Samples are drawn every
        ``every_n_steps`` optimizer steps and/or every ``every_n_validations`` validation runs
        (0: off), and always when the stage ends."""
        self.prompts = [
            {"prompt": p["prompt"], "media": list(p.get("media") or [])}
            if isinstance(p, Mapping)
            else {"prompt": str(p), "media": []}
            for p in prompts
        ]
        self.directory, self.every_n_steps, self.every_n_validations = (
            Path(directory),
            every_n_steps,
            every_n_validations,
        )
        self._validations = 0
        self.max_new_tokens, self.seed = max_new_tokens, seed
        self._generator = None
        self._last_step = -1
        self._warned = False

    def _get_generator(self, pl_module):
        if self._generator is None:
            conditioners = pl_module.conditioners or load_conditioners(pl_module.model_spec)
            self._generator = Generator.from_model(
                pl_module.model,
                pl_module.tokenizer,
                conditioners,
                pl_module.model_spec,
                pl_module.device,
                bundle=f"stage{pl_module.stage} (training)",
            )
        return self._generator

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0 and trainer.global_step:
            self.sample(trainer, pl_module)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        self._validations += 1
        if self.every_n_validations and self._validations % self.every_n_validations == 0:
            self.sample(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if not trainer.interrupted:
            self.sample(trainer, pl_module)

    @torch.no_grad()
    def sample(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[dict]:
        if is_sharded(trainer.strategy):  # the generator needs the whole model on one rank
            if not self._warned and trainer.is_global_zero:
                log.info(
                    "generation samples are off under a sharded strategy (FSDP2 / ZeRO-3): sample from the "
                    "stage bundle instead (python -m nextgpt.generate --bundle ...)"
                )
            self._warned = True
            return []
        if not trainer.is_global_zero or trainer.global_step == self._last_step or not self.prompts:
            return []
        self._last_step = trainer.global_step
        model = cast(NextGPTStage, pl_module).model  # the stages are the modules this callback samples
        assert model is not None  # built by configure_model before any step or validation
        was_training = model.training
        gen = self._get_generator(pl_module)
        out = self.directory / f"step{trainer.global_step:06d}"
        rows = []
        try:
            for i, item in enumerate(self.prompts):
                try:
                    res = gen.chat(
                        item["prompt"],
                        item.get("media", []),
                        max_new_tokens=self.max_new_tokens,
                        seed=self.seed,
                        out_dir=out / f"sample{i}",
                    )
                except ValueError as e:  # a bad sample prompt must not stop training
                    log.warning("generation sample %d (%r) failed: %s", i, item["prompt"], e)
                    continue
                rows.append(
                    {
                        "step": trainer.global_step,
                        "prompt": item["prompt"],
                        "media": list(item.get("media", [])),
                        "answer": res.text,
                        "signal_groups": res.signal_groups,
                        "notes": res.notes,
                        "files": {k: [str(f) for f in v] for k, v in res.files.items()},
                    }
                )
        finally:
            model.train(was_training)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "samples.jsonl", "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        groups = sum(len(r["signal_groups"]) for r in rows)
        for logger in trainer.loggers:
            logger.log_metrics({"samples/signal_groups": float(groups)}, step=trainer.global_step)
            self._log_table(logger, rows, trainer.global_step)
        return rows

    @staticmethod
    def _log_table(logger, rows: list[dict], step: int) -> None:
        if not isinstance(logger, WandbLogger) or not rows:
            return
        import wandb  # deferred: wandb costs ~0.4 s to import and only a W&B-logged run needs it

        kinds = {"image": wandb.Image, "audio": wandb.Audio, "video": wandb.Video}
        columns: list[str | int] = ["step", "prompt", "answer", "signal_groups", *kinds]
        data = []
        for r in rows:
            media = [kinds[k](r["files"][k][0]) if r["files"].get(k) else None for k in kinds]
            data.append([r["step"], r["prompt"], r["answer"], " ".join(r["signal_groups"]), *media])
        logger.experiment.log({"samples": wandb.Table(columns=columns, data=data)}, step=step)
