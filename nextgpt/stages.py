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

import contextlib
import logging
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, TypedDict, cast

import lightning as L
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy, ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info

from nextgpt.bundles import load_bundle_weights
from nextgpt.cache.captions import CaptionSources, CaptionTargets
from nextgpt.denoising import DenoisingObjective
from nextgpt.losses import (
    alignment_sum,
    caption_loss_sum,
    chunked_caption_loss_sum,
    count_keys,
    modality_mean,
)
from nextgpt.model import NextGPT, build_nextgpt, parameter_counts, torch_dtype
from nextgpt.model_spec import ModelSpec
from nextgpt.optim import build_optimizer, build_scheduler
from nextgpt.spec import LossSpec, OptimSpec, ShardingSpec
from nextgpt.strategies import WrapByClassName, shard_model
from nextgpt.tokens import Tokens

log = logging.getLogger(__name__)


@contextlib.contextmanager
def whole_weights():
    """Build with whole weights even inside DeepSpeed's ``zero.Init`` (ZeRO-3 builds the module in
    it): ``from_pretrained`` then loads every weight as usual, and DeepSpeed partitions the built
    model when its engine starts. Outside ``zero.Init`` this does nothing."""
    zero = sys.modules.get("deepspeed.runtime.zero.partition_parameters")
    active = zero is not None and getattr(zero, "top_level_context", None) is not None
    if active:
        zero.shutdown_init_context()
    try:
        yield
    finally:
        if active:
            zero.restore_init_context()


class StepWindow(TypedDict):
    """``batch["window"]`` (``datamodules.steps``): the counts summed over the micro-batches of one
    optimizer step, and this micro-batch's place among them."""

    counts: dict[str, float]
    index: int
    size: int


class StageBatch(TypedDict, total=False):
    """What a stage reads of a batch (``nextgpt.batch.Collator``'s output, plus ``window`` where the
    loader groups the micro-batches of a step); the rest goes to ``NextGPT.forward`` by name."""

    keys: list[str]
    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor
    media_mask: torch.Tensor
    media: dict[str, torch.Tensor]
    media_features: dict[str, torch.Tensor]
    media_sequence: list[tuple[str, int, bool]]
    output_captions: dict[str, list[str]]  # a modality's captions, one per output group
    output_media: dict[str, torch.Tensor]  # a modality's target media, for the denoising loss
    counts: dict[str, float]  # label tokens and output groups of the batch ("tokens", "align/<m>", ...)
    window: StepWindow
    num_skipped: int
    skipped_by_reason: dict[str, int]
    num_truncated: int
    media_from_cache: int
    media_decoded: int
    padding: float


class NextGPTStage(L.LightningModule):
    stage: ClassVar[int]
    # the class's own groups; an instance adds "vocab_rows" under model.vocab_rows=all (trainable_groups_of)
    trainable_groups: tuple[str, ...]
    use_lora: ClassVar[bool] = False
    aligns: bool = False  # does this stage's loss include the alignment term (evaluation may switch it on)

    def __init__(
        self,
        model: ModelSpec | Mapping[str, Any],
        optim: OptimSpec | Mapping[str, Any],
        loss: LossSpec | Mapping[str, Any],
        init_from: str | None = None,
        sharding: ShardingSpec | None = None,
        cache_dir: str | None = None,
        run_config: Mapping[str, Any] | None = None,
        tokens: Tokens | None = None,
    ):
        super().__init__()
        self.optim = optim if isinstance(optim, OptimSpec) else OptimSpec.of(optim)
        self.loss = loss if isinstance(loss, LossSpec) else LossSpec.of(loss)
        # a checkpoint's hyperparameters are plain containers (read back with weights_only=True)
        # (``model``: a ModelSpec, or the ``model`` config section it is made of)
        self.model_spec = ModelSpec.from_config(model)
        self.save_hyperparameters(ignore=["model", "optim", "loss", "sharding", "tokens"])
        self.tokens = tokens  # the data's tokenizer and layout, shared (None: configure_model loads them)
        self.hparams.update(
            model=self.model_spec.as_dict(),
            optim=self.optim.as_dict(),
            loss=self.loss.as_dict(),
            sharding=None if sharding is None else sharding.as_dict(),
        )
        self.trainable_groups = trainable_groups_of(self.stage, self.model_spec)
        self.sharding = sharding
        self.cache_dir = (
            Path(cache_dir) if cache_dir else Path(".cache") / "features"
        )  # for caches with no data folder
        self.init_from = init_from
        self.model: NextGPT | None = None
        self.conditioners: dict = {}  # frozen decoder text encoders: not submodules on purpose
        # the decoders' caption embeddings, from disk caches or computed (bounded); built with the model
        self.targets: CaptionTargets | None = None
        self.strict_loading = False  # checkpoints hold trainable tensors only
        self._step_terms: dict[str, torch.Tensor] = {}  # loss shares of the current optimizer step
        self.start_step = 0

    # --- building ------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.model is not None:
            return
        with whole_weights():
            model, tokenizer, conditioners = build_nextgpt(self.model_spec, tokens=self.tokens)
        if self.use_lora:
            model.apply_lora(self.model_spec.need_lora())
        loaded: list[str] = []
        if self.init_from:
            loaded = load_bundle_weights(self.init_from, model, self.model_spec)
            rank_zero_info(
                f"stage {self.stage}: started from bundle {self.init_from} ({len(loaded)} tensors)"
            )
        else:
            rank_zero_info(
                f"stage {self.stage}: no earlier bundle to start from; new weights are freshly initialised"
            )
        self.trainable_names = model.set_trainable(self.trainable_groups)
        # what the stage bundle keeps: what this stage trains and what it carried over; trained
        # vocabulary rows go into the bundle's base_rows file instead (their names change with LoRA)
        matrices = set(model.parameter_groups()["vocab_rows"])
        self.bundle_names = sorted((set(self.trainable_names) | set(loaded)) - matrices)
        self.shard(model)
        self.model, self.tokenizer = model, tokenizer
        self.conditioners = conditioners if self.aligns else {}
        self.targets = CaptionTargets(self.conditioners, self.cache_dir / "captions")
        self.denoisers = self.load_denoisers() if self.aligns else {}
        trainable, frozen = parameter_counts(model)
        rank_zero_info(
            f"stage {self.stage} ({type(self).__name__}): trainable {trainable:,} params in "
            f"{len(self.trainable_names)} tensors ({', '.join(self.trainable_groups)}); frozen {frozen:,}"
        )

    def shard(self, model: NextGPT) -> None:
        """Under FSDP2, shard the model by the ``sharding`` policy; under ZeRO-3, tell DeepSpeed
        which weights are read outside their own module's forward."""
        strategy = self._trainer.strategy if self._trainer is not None else None
        if isinstance(strategy, ModelParallelStrategy):
            mesh = self.device_mesh
            assert mesh is not None, "ModelParallelStrategy sets the device mesh before configure_model"
            sharding = self.sharding or ShardingSpec()
            dtype = lambda name: torch_dtype(name) if name else None  # noqa: E731
            units = shard_model(
                model,
                mesh["data_parallel"],
                WrapByClassName(sharding.wrap),
                reshard_after_forward=sharding.reshard_after_forward,
                param_dtype=dtype(sharding.param_dtype),
                reduce_dtype=dtype(sharding.reduce_dtype),
            )
            rank_zero_info(
                f"stage {self.stage}: FSDP2 over {mesh['data_parallel'].size()} ranks, "
                f"{len(units)} units + the root"
            )
        elif isinstance(strategy, DeepSpeedStrategy) and getattr(strategy, "zero_stage_3", False):
            import deepspeed  # deferred: deepspeed is optional and ~1 s to import; only ZeRO-3 runs get here

            for p in model.new_tokens.parameters():  # read by NextGPT's forward, not their own
                deepspeed.zero.register_external_parameter(model, p)

    def built(self) -> NextGPT:
        """The model, which ``configure_model`` builds before Lightning trains, validates or optimises."""
        if self.model is None:
            raise RuntimeError(f"stage {self.stage}: the model is not built yet (configure_model builds it)")
        return self.model

    def checkpoint_keys(self) -> list[str]:
        """The state-dict keys a checkpoint keeps: the trainable tensors."""
        return [f"model.{n}" for n in self.trainable_names]

    def load_denoisers(self) -> dict:
        """The frozen VAE + UNet of each decoder whose denoising loss is switched on."""
        if self.loss.denoise <= 0:
            return {}
        out = {}
        for name, dec in self.model_spec.generated.items():
            if dec.denoise:
                out[name] = DenoisingObjective(dec.path, dec.conditioning, torch_dtype(dec.dtype))
        rank_zero_info(
            f"stage {self.stage}: denoising loss on for {sorted(out)} (weight {self.loss.denoise})"
        )
        return out

    # --- alignment targets: each decoder's own text encoder (nextgpt.cache.captions) --------
    def caption_targets(self, captions: Mapping[str, list[str]]) -> dict[str, torch.Tensor]:
        assert self.targets is not None, "configure_model builds the caption targets"
        return self.targets.get(captions, self.device)

    def on_train_epoch_start(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        set_epoch = getattr(dm, "set_epoch", None)
        if set_epoch is not None:  # streamed data: a new pass order per epoch
            set_epoch(self.current_epoch)

    def on_fit_start(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if self.aligns and isinstance(dm, CaptionSources):
            assert self.targets is not None, "configure_model builds the caption targets"
            dm.open_caption_stores(
                self.targets,
                device=self.device,
                is_global_zero=self.trainer.is_global_zero,
                barrier=self.trainer.strategy.barrier,
            )

    def on_train_epoch_end(self) -> None:
        if self.targets is not None:
            self.targets.flush()  # so a resumed or later run finds them
            self.targets.refresh()

    def on_train_end(self) -> None:
        if self.targets is not None:
            self.targets.flush()

    # --- loss ----------------------------------------------------------------------------
    # Every term is a sum over this batch divided by a count of the whole optimizer step: label
    # tokens for the cross-entropy, groups per modality for the alignment and denoising terms.
    # Training takes the counts of the step's every micro-batch on every rank (``StepWindows``
    # attaches them; one all-reduce sums the ranks), so 2 ranks x batch b, 1 rank x batch 2b and
    # 1 rank x batch b x 2 accumulated micro-batches give the same gradient.
    def loss_terms(self, batch: StageBatch, counts: Mapping[str, float]) -> dict[str, torch.Tensor]:
        """This batch's share of each loss term of the step whose totals are ``counts``."""
        model = self.built()
        chunk = self.loss.logits_chunk  # no full-vocabulary logits: the labelled positions, in chunks
        out = model(**batch, compute_logits=not chunk)
        ce = (
            chunked_caption_loss_sum(out.hidden, batch["labels"], model.head_logits, int(chunk))
            if chunk
            else caption_loss_sum(out.logits, batch["labels"])
        )
        terms = {"ce": ce / max(float(counts["tokens"]), 1.0)}
        if self.aligns:
            cond = out.conditioning
            zero = torch.zeros((), device=out.hidden.device)
            captions = batch.get("output_captions", {})
            targets = self.caption_targets({m: captions.get(m, []) for m in cond})
            terms["align"] = modality_mean(
                {m: alignment_sum(cond[m], targets.get(m)) for m in cond},
                counts,
                "align",
                zero,
                self.loss.align_by_modality,
            )
            if any(counts.get(f"denoise/{m}", 0) > 0 for m in self.denoisers):
                media = batch.get("output_media", {})
                noised = {
                    m: self.denoisers[m].to(self.device).item_losses(cond[m], media[m]).sum()
                    for m in cond
                    if m in self.denoisers and m in media
                }
                terms["denoise"] = modality_mean(noised, counts, "denoise", zero)
        # ce, align, denoise: a sum of tensors ("ce" is always there)
        terms["loss"] = cast(torch.Tensor, sum(self.loss.weight(k) * v for k, v in terms.items()))
        return terms

    def compute_loss(self, batch: StageBatch) -> dict[str, torch.Tensor]:
        """The loss terms of one batch on its own (evaluation, tests): means over this batch."""
        return self.loss_terms(batch, batch["counts"])

    def step_counts(self, local: Mapping[str, float]) -> dict[str, float]:
        """The step's counts summed over all ranks (one all-reduce of a few numbers)."""
        keys = count_keys(self.built().modality_names)
        values = torch.tensor(
            [float(local.get(k, 0.0)) for k in keys], dtype=torch.float64, device=self.device
        )
        if self._trainer is not None and self.trainer.world_size > 1:
            values = self.trainer.strategy.reduce(values, reduce_op="sum")
        return dict(zip(keys, values.tolist(), strict=False))

    def gradient_scale(self) -> float:
        """Undo the averaging the training loop applies: the data-parallel mean over ranks and
        Lightning's division by ``accumulate_grad_batches`` (DeepSpeed divides by its own
        accumulation count again), so the step's gradient is that of the loss over its global batch."""
        if self._trainer is None:
            return 1.0
        accumulate = int(self.trainer.accumulate_grad_batches)
        scale = float(self.trainer.world_size * accumulate)
        if isinstance(self.trainer.strategy, DeepSpeedStrategy):
            scale *= accumulate
        return scale

    def training_step(self, batch: StageBatch, batch_idx: int):
        window: StepWindow = batch.get("window") or {"counts": batch["counts"], "index": 0, "size": 1}
        terms = self.loss_terms(batch, self.step_counts(window["counts"]))
        # log the step's loss over its global batch: this micro-batch's shares, summed over the
        # window here and over the ranks by the logger's all-reduce
        for k, v in terms.items():
            self._step_terms[k] = self._step_terms.get(k, 0.0) + v.detach()
        if window["index"] == window["size"] - 1:
            self.log_dict(
                {f"train/{k}": v for k, v in self._step_terms.items()},
                prog_bar=True,
                sync_dist=True,
                reduce_fx="sum",
                batch_size=1,
            )
            self._step_terms = {}
        return terms["loss"] * self.gradient_scale()

    def validation_step(self, batch: StageBatch, batch_idx: int) -> None:
        if not batch["keys"]:  # every sample of the batch was unreadable
            return
        losses = self.compute_loss(batch)
        self.log_dict(
            {f"val/{k}": v for k, v in losses.items()}, batch_size=len(batch["keys"]), sync_dist=True
        )

    # --- optimisation --------------------------------------------------------------------
    def configure_optimizers(self):
        opt = build_optimizer(self.optim, [p for p in self.built().parameters() if p.requires_grad])
        total = max(1, int(self.trainer.estimated_stepping_batches)) if self._trainer is not None else 1
        sched = build_scheduler(self.optim, opt, total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # --- checkpoints hold trainable tensors only ---------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep = set(self.checkpoint_keys())
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
    trainable_groups = (
        "lora",
        "input_projector",
        "output_projectors",
        "new_tokens.markers",
        "new_tokens.signals",
    )
    use_lora = True
    aligns = True


def trainable_groups_of(stage: int, spec: ModelSpec) -> tuple[str, ...]:
    """The stage's trainable groups, plus the LLM's embedding and head matrices under
    ``model.vocab_rows=all`` (every stage of the original trained them)."""
    groups = STAGES[stage].trainable_groups
    return groups + ("vocab_rows",) if spec.trains_all_rows else groups


STAGES: dict[int, type[NextGPTStage]] = {
    cls.stage: cls for cls in (Stage1EncodingAlignment, Stage2DecodingAlignment, Stage3InstructionTuning)
}
