"""The run spec: what one training run is, resolved once from the composed (and validated) config.

``train.py`` composes the Hydra config; ``nextgpt.schema.validate`` checks it; :func:`run_spec`
turns it into the frozen dataclasses below. Everything derived from the config (the previous
stage's bundle, the batch plan with its gradient accumulation, the bundle this run writes, the
sweep tag) is computed here, once, instead of being recomputed or written back into the config by
the code that needs it. The components take the part they need:

| spec | who takes it |
|---|---|
| :class:`StageSpec` (with :class:`OptimSpec`, :class:`LossSpec`) | the stage LightningModule |
| :class:`BatchPlan` | the trainer's gradient accumulation, the memory plan, DeepSpeed's batch keys |
| :class:`PathsSpec` | the run folder, the feature caches, the bundles |
| :class:`~nextgpt.model_spec.ModelSpec` | the model's building, the data's tokens, the memory plan |
| :class:`ShardingSpec` | the stage LightningModule under FSDP2 |
| :class:`RunSpec` | ``nextgpt.cli.train`` |

This module is type-checked strictly (``[tool.mypy]`` in ``pyproject.toml``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig

from nextgpt.config import OBJECTIVES, STAGES, ConfigError
from nextgpt.model_spec import ModelSpec, plain


# --- the batch ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class BatchPlan:
    """How a step's global batch is made: world size x per-device batch x accumulation."""

    devices: int
    num_nodes: int
    per_device: int
    accumulate: int

    @property
    def world_size(self) -> int:
        return self.devices * self.num_nodes

    @property
    def global_batch(self) -> int:
        return self.world_size * self.per_device * self.accumulate

    def __str__(self) -> str:
        return (
            f"world size {self.world_size} ({self.devices} device(s) x {self.num_nodes} node(s)), "
            f"per-device batch {self.per_device}, gradient accumulation {self.accumulate}, "
            f"global batch {self.global_batch}"
        )


def device_count(devices: Any, accelerator: Any) -> int:
    """Processes per node that Lightning starts for ``trainer.devices`` on ``trainer.accelerator``."""
    if isinstance(devices, list | tuple | ListConfig):
        return len(devices)
    if isinstance(devices, str) and devices not in ("auto", "-1"):
        parts = [d for d in devices.split(",") if d.strip()]
        return len(parts) if len(parts) > 1 or devices.endswith(",") else int(devices)
    if devices in ("auto", -1, "-1"):
        if str(accelerator) in ("gpu", "cuda", "auto"):
            return max(1, torch.cuda.device_count()) if torch.cuda.is_available() else 1
        return 1
    return int(devices)


def batch_plan(cfg: DictConfig) -> BatchPlan:
    """The batch plan of ``trainer.devices/num_nodes``, ``dataset.batch_size`` and either
    ``trainer.accumulate_grad_batches`` or ``stage.global_batch_size`` (which derives the
    accumulation). Raises ``ConfigError`` (before anything loads) when the numbers do not divide,
    or contradict an explicit accumulation."""
    try:
        devices = device_count(cfg.trainer.devices, cfg.trainer.get("accelerator", "auto"))
    except (TypeError, ValueError):
        raise ConfigError(
            [f"trainer.devices={cfg.trainer.devices!r}: must be a count, a list of ids or 'auto'"]
        ) from None
    nodes, per_device = int(cfg.trainer.num_nodes), int(cfg.dataset.batch_size)
    accumulate = cfg.trainer.get("accumulate_grad_batches", 1)
    if isinstance(accumulate, bool) or not isinstance(accumulate, int) or accumulate < 1:
        raise ConfigError([f"trainer.accumulate_grad_batches={accumulate!r}: must be an integer >= 1"])
    wanted = cfg.stage.get("global_batch_size")
    if wanted is None:
        return BatchPlan(devices, nodes, per_device, accumulate)
    per_step = devices * nodes * per_device
    if wanted % per_step:
        raise ConfigError(
            [
                f"stage.global_batch_size={wanted}: must be a multiple of devices x nodes x "
                f"dataset.batch_size = {devices} x {nodes} x {per_device} = {per_step} "
                "(the accumulation is global / that)"
            ]
        )
    derived = int(wanted // per_step)
    if accumulate not in (1, derived):
        raise ConfigError(
            [
                f"trainer.accumulate_grad_batches={accumulate}: contradicts stage.global_batch_size={wanted}, "
                f"which needs {derived} with {devices} x {nodes} x {per_device}; set only one of them"
            ]
        )
    return BatchPlan(devices, nodes, per_device, derived)


# --- the stage ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class LossSpec:
    """The weights of a stage's loss terms (``stage.loss``)."""

    ce: float = 1.0
    align: float = 1.0
    denoise: float = 0.0
    logits_chunk: int | None = None  # the caption loss over labelled positions, N at a time
    align_by_modality: Mapping[str, float] = field(default_factory=dict)  # a modality's alignment weight

    @classmethod
    def of(cls, node: Any) -> LossSpec:
        d = plain(node)
        chunk = d.get("logits_chunk")
        return cls(
            ce=float(d.get("ce", 1.0)),
            align=float(d.get("align", 1.0)),
            denoise=float(d.get("denoise", 0.0)),
            logits_chunk=None if chunk is None else int(chunk),
            align_by_modality={str(k): float(v) for k, v in (d.get("align_by_modality") or {}).items()},
        )

    def weight(self, term: str) -> float:
        """The weight of a loss term by name (``ce``, ``align``, ``denoise``)."""
        return float(getattr(self, term))

    def as_dict(self) -> dict[str, Any]:
        return {
            "ce": self.ce,
            "align": self.align,
            "denoise": self.denoise,
            "logits_chunk": self.logits_chunk,
            "align_by_modality": dict(self.align_by_modality),
        }


@dataclass(frozen=True)
class OptimSpec:
    """``stage.optim``: the learning rate and its schedule; ``optimizer`` and ``scheduler`` are the
    Hydra partials (plain dicts with ``_target_``) built over the trainable parameters."""

    lr: float
    weight_decay: float
    warmup_ratio: float = 0.1
    betas: tuple[float, float] = (0.9, 0.999)
    optimizer: Mapping[str, Any] = field(default_factory=dict)
    scheduler: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, node: Any) -> OptimSpec:
        d = plain(node)
        betas = d.get("betas") or (0.9, 0.999)
        return cls(
            lr=float(d["lr"]),
            weight_decay=float(d.get("weight_decay", 0.0)),
            warmup_ratio=float(d.get("warmup_ratio", 0.1)),
            betas=(float(betas[0]), float(betas[1])),
            optimizer=dict(d.get("optimizer") or {}),
            scheduler=dict(d.get("scheduler") or {}),
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "lr": self.lr,
            "weight_decay": self.weight_decay,
            "warmup_ratio": self.warmup_ratio,
            "betas": list(self.betas),
            "optimizer": dict(self.optimizer),
            "scheduler": dict(self.scheduler),
        }


@dataclass(frozen=True)
class StageSpec:
    """``stage``: which of the three stages, on which objective, with what optimiser and loss."""

    number: int
    name: str
    objective: str
    optim: OptimSpec
    loss: LossSpec

    @classmethod
    def of(cls, node: Any) -> StageSpec:
        number, objective = int(node.number), str(node.objective)
        if number not in STAGES:
            raise ConfigError([f"stage.number={number!r}: must be one of {list(STAGES)}"])
        if objective not in OBJECTIVES:
            raise ConfigError([f"stage.objective={objective!r}: must be one of {list(OBJECTIVES)}"])
        return cls(
            number=number,
            name=str(node.get("name", f"stage{number}")),
            objective=objective,
            optim=OptimSpec.of(node.optim),
            loss=LossSpec.of(node.get("loss")),
        )


# --- sharding ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShardingSpec:
    """``sharding``: FSDP2's units and mixed precision (``strategy=fsdp`` sets it; null: none)."""

    wrap: tuple[str, ...] = ("DecoderLayer",)  # class-name suffixes of the modules that become units
    reshard_after_forward: bool = True
    param_dtype: str | None = None  # compute in it (MixedPrecisionPolicy); None: the weights' own
    reduce_dtype: str | None = None  # reduce gradients in it

    @classmethod
    def of(cls, node: Any) -> ShardingSpec | None:
        """The spec of a ``sharding`` node; None for null (or empty: nothing is sharded)."""
        d = plain(node)
        if not d:
            return None
        wrap = d.get("wrap", ["DecoderLayer"])
        return cls(
            wrap=(wrap,) if isinstance(wrap, str) else tuple(str(w) for w in wrap),
            reshard_after_forward=bool(d.get("reshard_after_forward", True)),
            param_dtype=str(d["param_dtype"]) if d.get("param_dtype") else None,
            reduce_dtype=str(d["reduce_dtype"]) if d.get("reduce_dtype") else None,
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "wrap": list(self.wrap),
            "reshard_after_forward": self.reshard_after_forward,
            "param_dtype": self.param_dtype,
            "reduce_dtype": self.reduce_dtype,
        }


# --- paths and the run -------------------------------------------------------------------------
@dataclass(frozen=True)
class PathsSpec:
    """The folders a run reads from and writes into (``paths``), resolved."""

    bundles: Path
    checkpoints: Path
    cache_dir: Path
    output_dir: Path

    @classmethod
    def of(cls, node: Any) -> PathsSpec:
        return cls(
            bundles=Path(str(node.bundles)),
            checkpoints=Path(str(node.checkpoints)),
            cache_dir=Path(str(node.cache_dir)),
            output_dir=Path(str(node.output_dir)),
        )

    @property
    def features(self) -> Path:
        """The ImageBind feature and caption caches."""
        return self.cache_dir / "features"

    def bundle_root(self, tag: str) -> Path:
        """Where a chain of stage bundles lives: ``bundles/``, or a sweep job's ``bundles/<tag>/``."""
        return self.bundles / tag if tag else self.bundles


@dataclass(frozen=True)
class RunSpec:
    """One training run, resolved: its stage, batch, folders, and what it starts from and writes."""

    stage: StageSpec
    batch: BatchPlan
    paths: PathsSpec
    model: ModelSpec
    sharding: ShardingSpec | None  # FSDP2's settings (None: the strategy shards nothing)
    seed: int
    tag: str  # a sweep job's swept values ("" outside a sweep): its own chain of bundles
    init_from: Path | None  # the bundle this stage starts from (None: stage 1 from the backbones)
    bundle: Path  # the bundle this run writes
    resume: bool | str  # true: resume an interrupted run of this config; a path: continue from it


def previous_bundle(stage: int, init_from: Any, bundle_root: Path) -> Path | None:
    """The bundle a stage starts from: ``init_from`` when given, else the previous stage's bundle
    of the same chain (``<bundle_root>/stage<N-1>``); none for stage 1."""
    if init_from:
        return Path(str(init_from))
    if stage == 1:
        return None
    return bundle_root / f"stage{stage - 1}"


def run_spec(cfg: DictConfig, tag: str = "") -> RunSpec:
    """Resolve a validated config into its :class:`RunSpec` (reads the config; writes nothing)."""
    stage = StageSpec.of(cfg.stage)
    paths = PathsSpec.of(cfg.paths)
    root = paths.bundle_root(tag)
    resume = cfg.get("resume", True)
    return RunSpec(
        stage=stage,
        batch=batch_plan(cfg),
        paths=paths,
        model=ModelSpec.from_config(cfg.model),
        sharding=ShardingSpec.of(cfg.get("sharding")),
        seed=int(cfg.seed),
        tag=tag,
        init_from=previous_bundle(stage.number, cfg.get("init_from"), root),
        bundle=root / f"stage{stage.number}",
        resume=resume if isinstance(resume, bool) else str(resume),
    )
