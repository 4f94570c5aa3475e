"""One small LightningModule per training stage: its trainable group and its loss, nothing else.

| stage | trains                                             | loss                         |
|-------|----------------------------------------------------|------------------------------|
| 1     | input projector, input-marker rows                 | caption cross-entropy        |
| 2     | signal-token rows, output projectors               | signal CE + alignment        |
| 3     | LoRA, both projectors, all new-token rows          | CE + alignment               |

The model is built in ``configure_model`` (so FSDP / DeepSpeed can shard it) from a config that
``nextgpt.config.validate`` has already checked.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, ClassVar, Mapping

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info

from nextgpt.bundles import load_bundle_weights, set_trainable
from nextgpt.model import NextGPT, build_nextgpt, parameter_counts
from nextgpt.prompts import IGNORE_INDEX

log = logging.getLogger(__name__)


def caption_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy on labelled (answer) positions only."""
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX
    )


def alignment_loss(pred: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Legacy NExT-GPT alignment: mean over conditioning tokens of the L2 distance to the target,
    averaged over the modalities present."""
    losses = [(pred[m].float() - target[m].to(pred[m].device).float()).norm(dim=-1).mean() for m in pred]
    return torch.stack(losses).mean()


class NextGPTStage(L.LightningModule):
    stage: ClassVar[int]
    trainable_groups: ClassVar[tuple[str, ...]]
    use_lora: ClassVar[bool] = False
    aligns: bool = False  # does this stage's loss include the alignment term (evaluation may switch it on)

    def __init__(
        self,
        model: Mapping[str, Any],
        optim: Mapping[str, Any],
        loss: Mapping[str, float],
        init_from: str | None = None,
        run_config: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.model_cfg, self.optim_cfg, self.loss_cfg = dict(model), dict(optim), dict(loss)
        self.init_from = init_from
        self.model: NextGPT | None = None
        self.conditioners: dict = {}  # frozen decoder text encoders: not submodules on purpose
        self.caption_cache: dict[tuple[str, str], torch.Tensor] = {}  # captions with no disk cache
        self.caption_stores: dict[str, list] = {}  # modality -> FeatureStores of decoder text embeddings
        self.strict_loading = False  # checkpoints hold trainable tensors only

    # --- building ------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.model is not None:
            return
        model, tokenizer, conditioners = build_nextgpt(self.model_cfg)
        if self.use_lora:
            model.apply_lora(**{k: self.model_cfg["lora"][k] for k in ("r", "alpha", "dropout", "target_modules")})
        loaded: list[str] = []
        if self.init_from:
            loaded = load_bundle_weights(self.init_from, model)
            rank_zero_info(f"stage {self.stage}: started from bundle {self.init_from} ({len(loaded)} tensors)")
        else:
            rank_zero_info(f"stage {self.stage}: no earlier bundle to start from; new weights are freshly initialised")
        self.trainable_names = set_trainable(model, self.trainable_groups)
        # what the stage bundle keeps: what this stage trains and what it carried over
        self.bundle_names = sorted(set(self.trainable_names) | set(loaded))
        self.model, self.tokenizer = model, tokenizer
        self.conditioners = conditioners if self.aligns else {}
        self.denoisers = self.load_denoisers() if self.aligns else {}
        trainable, frozen = parameter_counts(model)
        rank_zero_info(
            f"stage {self.stage} ({type(self).__name__}): trainable {trainable:,} params in "
            f"{len(self.trainable_names)} tensors ({', '.join(self.trainable_groups)}); frozen {frozen:,}"
        )

    def load_denoisers(self) -> dict:
        """The frozen VAE + UNet of each decoder whose denoising loss is switched on."""
        from nextgpt.denoising import DenoisingObjective
        from nextgpt.model import torch_dtype

        if float(self.loss_cfg.get("denoise", 0.0)) <= 0:
            return {}
        out = {}
        for name, m in self.model_cfg["modalities"].items():
            dec = m["decoder"]
            if dec.get("denoise"):
                out[name] = DenoisingObjective(dec["path"], dec["conditioning"], torch_dtype(dec.get("dtype", "float32")))
        rank_zero_info(f"stage {self.stage}: denoising loss on for {sorted(out)} (weight {self.loss_cfg['denoise']})")
        return out

    # --- alignment targets: each decoder's own text encoder, computed once per caption ------
    def caption_targets(self, captions: Mapping[str, list[str]]) -> dict[str, torch.Tensor]:
        """Each caption's embedding by its decoder's text encoder: from the disk caches when there,
        else computed once (all of a batch's new captions in one encoder call) and kept in memory."""
        from nextgpt.features import caption_key

        out = {}
        for name, caps in captions.items():
            stores = self.caption_stores.get(name, ())
            stored = {c: next((s for s in stores if caption_key(c) in s), None) for c in set(caps)}
            missing = sorted(c for c, store in stored.items() if store is None and (name, c) not in self.caption_cache)
            if missing:
                self.cache_captions(name, missing)
            out[name] = torch.stack([
                torch.from_numpy(stored[c].get(caption_key(c))).float() if stored[c] is not None
                else self.caption_cache[(name, c)]
                for c in caps
            ])
        return out

    @torch.no_grad()
    def cache_captions(self, name: str, captions: list[str], batch_size: int = 64) -> None:
        conditioner = self.conditioners[name].to(self.device)
        for i in range(0, len(captions), batch_size):
            chunk = captions[i : i + batch_size]
            for caption, emb in zip(chunk, conditioner.encode(chunk).cpu()):
                self.caption_cache[(name, caption)] = emb

    def on_train_epoch_start(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if hasattr(dm, "set_epoch"):  # streamed data: a new pass order per epoch
            dm.set_epoch(self.current_epoch)

    def on_fit_start(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if self.aligns and dm is not None and hasattr(dm, "conversations_by_source"):
            self.open_caption_stores(dm.conversations_by_source, dm.cache_fallback,
                                     is_global_zero=self.trainer.is_global_zero, barrier=self.trainer.strategy.barrier)

    def open_caption_stores(self, conversations_by_source, fallback: str, *, is_global_zero: bool = True,
                            barrier=lambda: None) -> None:
        """Each source's caption embeddings by each decoder's text encoder, on disk next to the data:
        created on first use, completed when captions were added, then read memory-mapped.
        Rank 0 writes; the other ranks wait at ``barrier`` and then read."""
        from nextgpt.cache import caption_store, compute_captions

        if not is_global_zero:
            barrier()
        for src, convs in conversations_by_source:
            conditioner = self.conditioners.get(src["modality"])
            captions = [cap for c in convs for name, cap in c.captions_out if name == src["modality"]]
            if conditioner is None or not captions:
                continue
            store = caption_store(src, conditioner.to(self.device), fallback)
            if is_global_zero:
                before = len(store)
                added = compute_captions(store, captions, conditioner)
                state = "created" if not before else ("completed" if added else "complete")
                rank_zero_info(f"stage {self.stage}: caption cache {store.directory} {state}: "
                               f"{len(store)} embeddings ({added} new)")
            self.caption_stores.setdefault(src["modality"], []).append(store)
        if is_global_zero:
            barrier()
        for stores in self.caption_stores.values():
            for store in stores:
                store.reload()

    # --- loss ----------------------------------------------------------------------------
    def compute_loss(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        out = self.model(**batch)
        losses = {"ce": caption_loss(out.logits, batch["labels"])}
        if self.aligns and out.conditioning:
            targets = self.caption_targets({m: batch["output_captions"][m] for m in out.conditioning})
            losses["align"] = alignment_loss(out.conditioning, targets)
            media = batch.get("output_media", {})
            terms = [self.denoisers[m].to(self.device).loss(out.conditioning[m], media[m])
                     for m in out.conditioning if m in self.denoisers and m in media]
            if terms:
                losses["denoise"] = torch.stack(terms).mean()
        losses["loss"] = sum(float(self.loss_cfg.get(k, 1.0)) * v for k, v in losses.items())
        return losses

    def training_step(self, batch: Mapping[str, Any], batch_idx: int):
        if batch is None:  # every sample of the batch was unreadable
            return None
        losses = self.compute_loss(batch)
        bs = batch["input_ids"].shape[0]
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, prog_bar=True, batch_size=bs)
        self.log("data/skipped", float(batch.get("num_skipped", 0)), reduce_fx="sum", batch_size=bs)
        for reason, n in batch.get("skipped_by_reason", {}).items():
            self.log(f"data/skipped/{reason}", float(n), reduce_fx="sum", batch_size=bs)
        self.log("data/truncated", float(batch.get("num_truncated", 0)), reduce_fx="sum", batch_size=bs)
        return losses["loss"]

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        if batch is None:
            return
        losses = self.compute_loss(batch)
        self.log_dict({f"val/{k}": v for k, v in losses.items()}, batch_size=batch["input_ids"].shape[0])

    # --- optimisation --------------------------------------------------------------------
    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(
            params, lr=float(self.optim_cfg["lr"]), weight_decay=float(self.optim_cfg["weight_decay"]),
            betas=tuple(self.optim_cfg.get("betas", (0.9, 0.999))),
        )
        total = max(1, int(self.trainer.estimated_stepping_batches)) if self._trainer is not None else 1
        warmup = int(float(self.optim_cfg.get("warmup_ratio", 0.1)) * total)

        def schedule(step: int) -> float:  # linear warm-up, then linear decay to zero
            if step < warmup:
                return (step + 1) / (warmup + 1)
            return max(0.0, (total - step) / max(1, total - warmup))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # --- checkpoints hold trainable tensors only ---------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep = {f"model.{n}" for n in self.trainable_names}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}


class Stage1EncodingAlignment(NextGPTStage):
    """X-to-text captioning: teaches the input projector to speak the LLM's language."""

    stage = 1
    trainable_groups = ("input_projector", "new_tokens.markers")


class Stage2DecodingAlignment(NextGPTStage):
    """Text-to-X: signal tokens whose projected states match each decoder's caption embedding."""

    stage = 2
    trainable_groups = ("new_tokens.signals", "output_projectors")
    aligns = True


class Stage3InstructionTuning(NextGPTStage):
    """Instruction tuning: LoRA on the LLM plus both projectors and all new-token rows."""

    stage = 3
    trainable_groups = ("lora", "input_projector", "output_projectors", "new_tokens.markers", "new_tokens.signals")
    use_lora = True
    aligns = True


STAGES: dict[int, type[NextGPTStage]] = {cls.stage: cls for cls in (Stage1EncodingAlignment, Stage2DecodingAlignment, Stage3InstructionTuning)}


def bundle_dir(bundles_root: str | Path, stage: int) -> Path:
    return Path(bundles_root) / f"stage{stage}"
