"""The evaluation spec: what one ``evaluate.py`` run is, resolved once from the composed config.

``evaluate.py`` composes the Hydra config; :func:`eval_spec` turns it into the frozen dataclasses
below (the only function of the evaluation that reads the config); everything below
:mod:`nextgpt.cli.evaluate` takes the spec, or the part it needs:

| spec | who takes it |
|---|---|
| :class:`EvalSpec` | ``nextgpt.cli.evaluate``, ``tasks.run_benchmark``, ``scoring.score`` |
| :class:`TaskSpec` (:class:`BenchmarkSpec`, :class:`GenerationSpec`) | reading, answering, scoring |
| :class:`MetricSettings` | the feature-network metrics (FID, CLIP score, CLIPSIM, FAD, CLAP score) and SPICE |
| :class:`HeldoutSpec` | ``task=heldout_loss``: its data set and objective |

A value the run converts (``limit``, ``batch_size``, ``seed``, a generation setting) is converted
here, and a value that does not convert is a ``ConfigError`` naming the key. Interpolations are
resolved here too, against the whole config; the keys that ``evaluate.py`` itself sets when it
builds a logger or the held-out data module are left out (they are never read from the config).

This module is type-checked strictly (``[tool.mypy]`` in ``pyproject.toml``).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from nextgpt.config import ConfigError
from nextgpt.model_spec import plain

KINDS = ("caption", "generate")  # caption: X -> text; generate: text -> X
HELDOUT = "heldout_loss"
# what evaluate.py gives the held-out data module itself (nextgpt.cli.evaluate.heldout_datamodule)
DATAMODULE_ARGS = ("objective", "model", "template", "batch_size", "seed")
# what evaluate.py gives a W&B logger itself (nextgpt.evaluation.report.log_to_loggers)
WANDB_ARGS = ("name", "tags")


# --- reading the config ------------------------------------------------------------------------
def _value(node: Any, key: str) -> Any:
    """An entry of a config node, resolved (a node as a plain dict or list)."""
    v = node[key]
    return OmegaConf.to_container(v, resolve=True) if isinstance(v, DictConfig | ListConfig) else v


def _resolved(node: Any, leave_out: Collection[str] = ()) -> dict[str, Any]:
    """A config node as a plain dict, each entry resolved against the whole config but those in
    ``leave_out`` (set by the code, never read: their interpolations need not resolve here)."""
    return {str(key): _value(node, key) for key in node if key not in leave_out}


def _int(value: Any, key: str, *, lo: int | None = None) -> int:
    if isinstance(value, bool):
        raise ConfigError([f"{key}={value!r}: must be an integer"])
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ConfigError([f"{key}={value!r}: must be an integer"]) from None
    if lo is not None and n < lo:
        raise ConfigError([f"{key}={value!r}: must be an integer >= {lo}"])
    return n


def _float(value: Any, key: str) -> float:
    if isinstance(value, bool):
        raise ConfigError([f"{key}={value!r}: must be a number"])
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError([f"{key}={value!r}: must be a number"]) from None


def _optional_str(value: Any) -> str | None:
    return None if value is None else str(value)


# --- a benchmark task --------------------------------------------------------------------------
@dataclass(frozen=True)
class BenchmarkSpec:
    """``task.benchmark``: the reader of the benchmark's official layout, its folder, its options."""

    reader: str
    root: str
    options: Mapping[str, Any] = field(default_factory=dict)
    recorded: Mapping[str, Any] = field(default_factory=dict)  # the node as written, resolved (run.json)

    @classmethod
    def of(cls, node: Any) -> BenchmarkSpec:
        return cls(
            reader=str(node.reader),
            root=str(node.root),
            options=plain(node.get("options")),
            recorded=plain(node),
        )


@dataclass(frozen=True)
class GenerationSpec:
    """``task.generation``: how the model answers (the text decoding, and whether media are decoded)."""

    max_new_tokens: int
    temperature: float
    top_p: float
    decode: bool = True
    recorded: Mapping[str, Any] = field(default_factory=dict)  # the node as written, resolved (run.json)

    @classmethod
    def of(cls, node: Any) -> GenerationSpec:
        return cls(
            max_new_tokens=_int(node.max_new_tokens, "task.generation.max_new_tokens"),
            temperature=_float(node.temperature, "task.generation.temperature"),
            top_p=_float(node.top_p, "task.generation.top_p"),
            decode=bool(node.get("decode", True)),
            recorded=plain(node),
        )


@dataclass(frozen=True)
class TaskSpec:
    """A benchmark task of the paper (``configs/task/<name>.yaml``)."""

    name: str
    kind: str  # one of KINDS
    modality: str
    benchmark: BenchmarkSpec
    prompt: str  # the request; {caption}: the sample's caption put in as a phrase
    generation: GenerationSpec
    metrics: tuple[str, ...]
    answer: str | None = None  # the teacher-forced reply of a text-to-X task (align_loss)
    paper: Mapping[str, Any] = field(default_factory=dict)  # metric -> the paper's numbers

    @classmethod
    def of(cls, node: Any) -> TaskSpec:
        return cls(
            name=str(node.name),
            kind=str(node.kind),
            modality=str(node.modality),
            benchmark=BenchmarkSpec.of(node.benchmark),
            prompt=str(node.prompt),
            generation=GenerationSpec.of(node.generation),
            metrics=tuple(str(m) for m in node.metrics),
            answer=_optional_str(node.get("answer")),
            paper=plain(node.paper) if node.get("paper") else {},
        )

    @property
    def captioning(self) -> bool:
        return self.kind == "caption"


@dataclass(frozen=True)
class MetricSettings:
    """``metrics`` and ``feature_nets``: the metrics' settings and their pretrained networks."""

    inception: str | None  # FID
    vggish: str | None  # FAD
    clip: str | None  # CLIP score, CLIPSIM
    clap: str | None  # CLAP score, FAD with fad_backbone=clap
    fad_backbone: str = "vggish"  # checked where FAD is computed (an unknown one: FAD unavailable)
    spice_corenlp: str | None = None
    fid_image_size: int = 299
    max_video_frames: int | None = 32  # None: every frame

    @classmethod
    def of(cls, metrics: Any, nets: Any) -> MetricSettings:
        metrics = metrics if metrics is not None else {}
        nets = nets if nets is not None else {}
        frames = metrics.get("max_video_frames")
        return cls(
            inception=_optional_str(nets.get("inception")),
            vggish=_optional_str(nets.get("vggish")),
            clip=_optional_str(nets.get("clip")),
            clap=_optional_str(nets.get("clap")),
            fad_backbone=str(metrics.get("fad_backbone", "vggish")),
            spice_corenlp=_optional_str(metrics.get("spice_corenlp")),
            fid_image_size=_int(metrics.get("fid_image_size", 299), "metrics.fid_image_size", lo=1),
            max_video_frames=_int(frames, "metrics.max_video_frames") if frames else None,
        )


# --- the held-out losses -----------------------------------------------------------------------
@dataclass(frozen=True)
class HeldoutSpec:
    """``task=heldout_loss``: the data set the bundle's losses are computed on."""

    dataset: str  # dataset.name
    datamodule: Mapping[str, Any]  # the data module's node (``_target_`` and its arguments), resolved
    objective: str | None  # caption, generate or instruct; None: the bundle's stage.objective

    @classmethod
    def of(cls, dataset: Any, objective: Any) -> HeldoutSpec:
        """``dataset``: its own ``datamodule`` node; a shard dataset's samples are read from the
        NExT-GPT layout they are written from (in their JSON order, so ``limit=N`` is the same N
        samples on every run)."""
        if dataset.get("loader", "json") != "json":
            node = {
                "_target_": "datamodules.json_datamodule.NextGPTDataModule",
                **{k: _value(dataset, k) for k in ("sources", "max_length", "num_workers", "feature_cache")},
            }
        else:
            node = _resolved(dataset.datamodule, DATAMODULE_ARGS)
        return cls(dataset=str(dataset.name), datamodule=node, objective=_optional_str(objective))


# --- the run -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class EvalSpec:
    """One ``evaluate.py`` run, resolved: what it evaluates (a bundle, or given predictions), on which
    task, with which settings, and where it writes."""

    name: str  # task.name
    task: TaskSpec | None  # None for heldout_loss
    heldout: HeldoutSpec | None  # only for heldout_loss
    checkpoint: str  # the stage bundle (checked where it is loaded: predictions= needs none)
    predictions: str | None  # given outputs to score instead of running a model
    limit: int | None  # the first `limit` samples (None: all)
    batch_size: int
    device: str
    seed: int
    output_dir: Path  # the run folder
    metrics: MetricSettings
    loggers: tuple[Mapping[str, Any], ...] = ()  # each logger's node, resolved (benchmark tasks)
    wandb_samples: int = 16  # rows of the W&B sample table

    def benchmark_task(self) -> TaskSpec:
        """The task of a benchmark run (not ``heldout_loss``)."""
        if self.task is None:
            raise ValueError(f"task {self.name} is not a benchmark task")
        return self.task


def _loggers(node: Any, task: str) -> tuple[Mapping[str, Any], ...]:
    """Each configured logger's node, resolved as ``log_to_loggers`` instantiates it: a W&B logger
    named and tagged by the task (its own ``name`` / ``tags`` are never read)."""
    out = []
    for lc in (node or {}).values():
        if "Wandb" in str(lc.get("_target_", "")):
            out.append({**_resolved(lc, WANDB_ARGS), "name": f"eval-{task}", "tags": ["evaluate", task]})
        else:
            out.append(_resolved(lc))
    return tuple(out)


def eval_spec(cfg: DictConfig) -> EvalSpec:
    """Resolve a composed ``evaluate`` config into its :class:`EvalSpec` (reads the config; writes
    nothing). Raises ``ConfigError`` naming the key at fault."""
    name = str(cfg.task.name)
    task = heldout = None
    if name == HELDOUT:
        heldout = HeldoutSpec.of(cfg.dataset, cfg.get("objective"))
    else:
        kind = cfg.task.get("kind")
        if kind not in KINDS:
            raise ConfigError([f"task.kind={kind!r}: must be one of {list(KINDS)} (task {name})"])
        task = TaskSpec.of(cfg.task)
    limit = cfg.get("limit")
    return EvalSpec(
        name=name,
        task=task,
        heldout=heldout,
        checkpoint=str(cfg.checkpoint),
        predictions=_optional_str(cfg.get("predictions")),
        limit=None if limit is None else _int(limit, "limit"),
        batch_size=_int(cfg.batch_size, "batch_size", lo=1),
        device=str(cfg.device),
        seed=_int(cfg.seed, "seed"),
        output_dir=Path(str(cfg.paths.output_dir)),
        metrics=MetricSettings.of(cfg.get("metrics"), cfg.get("feature_nets")),
        loggers=_loggers(cfg.get("logger"), name) if task is not None else (),
        wandb_samples=_int(cfg.get("wandb_samples", 16), "wandb_samples"),
    )
