"""The schema of a composed config: ``validate`` checks the type and range of every key a run
uses, before anything is built or loaded, and raises one ``ConfigError`` listing every fault as
``key=value: reason``."""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from omegaconf import DictConfig, ListConfig, OmegaConf

from nextgpt import modality as modality_registry
from nextgpt.config import (
    ATTN_IMPLEMENTATIONS,
    CONFIG_DIR,
    DEEPSPEED_CPU_OPTIMIZERS,
    DTYPES,
    LOADERS,
    LOSS_TERMS,
    OBJECTIVES,
    SOURCE_FORMATS,
    STAGES,
    STRATEGY_NAMES,
    STRATEGY_TARGETS,
    ConfigError,
    given_overrides,
)
from nextgpt.encoders.imagebind_config import ImageBindConfig
from nextgpt.model_spec import COMPONENTS
from nextgpt.overrides import TARGET_NODES, appended_key_errors
from nextgpt.prompts import PAIR_STYLES, TEMPLATES
from nextgpt.tokens import MARKER_STYLES, VOCAB_ROWS

_UNRESOLVED = object()


@dataclass
class _Checker:
    cfg: Any
    errors: list

    def get(self, key: str) -> Any:
        try:
            return OmegaConf.select(self.cfg, key, throw_on_missing=True)
        except Exception as e:  # a missing mandatory value, an interpolation that fails to resolve
            self.errors.append(f"{key}: {str(e).splitlines()[0]}")
            return _UNRESOLVED

    def fail(self, key: str, value: Any, reason: str) -> None:
        if value is not _UNRESOLVED:  # already reported by get()
            self.errors.append(f"{key}={value!r}: {reason}")

    def int_(self, key: str, lo: int | None = None) -> int | None:
        v = self.get(key)
        if isinstance(v, bool) or not isinstance(v, int):
            self.fail(key, v, "must be an integer")
            return None
        if lo is not None and v < lo:
            self.fail(key, v, f"must be >= {lo}")
        return v

    def float_(
        self,
        key: str,
        lo: float | None = None,
        hi: float | None = None,
        lo_open: bool = False,
        hi_open: bool = True,
    ) -> float | None:
        v = self.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            self.fail(key, v, "must be a number")
            return None
        if lo is not None and (v < lo or (lo_open and v == lo)):
            self.fail(key, v, f"must be {'>' if lo_open else '>='} {lo}")
        if hi is not None and (v > hi or (hi_open and v == hi)):
            self.fail(key, v, f"must be {'<' if hi_open else '<='} {hi}")
        return float(v)

    def str_(self, key: str, choices: Iterable[str] | None = None) -> str | None:
        v = self.get(key)
        if not isinstance(v, str) or not v:
            self.fail(key, v, "must be a non-empty string")
            return None
        if choices is not None and v not in choices:
            self.fail(key, v, f"must be one of {list(choices)}")
        return v

    def mapping(self, key: str) -> Mapping | None:
        v = self.get(key)
        if not isinstance(v, (dict, DictConfig)):
            self.fail(key, v, "must be a mapping")
            return None
        return v

    def sequence(self, key: str, nonempty: bool = True) -> list | None:
        v = self.get(key)
        if not isinstance(v, (list, tuple, ListConfig)):
            self.fail(key, v, "must be a list")
            return None
        if nonempty and not len(v):
            self.fail(key, list(v), "must not be empty")
        return list(v)


def import_object(path: str):
    """``"package.module.Name"`` -> the object."""
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _check_partial(c: _Checker, key: str) -> None:
    """A ``_target_`` + ``_partial_: true`` node whose package is installed (not imported: a
    DeepSpeed optimizer must not import DeepSpeed just to validate a config)."""

    node = c.mapping(key)
    if node is None:
        return
    target = c.str_(f"{key}._target_")
    if target:
        top = target.split(".")[0]
        if importlib.util.find_spec(top) is None:
            c.fail(f"{key}._target_", target, f"package {top!r} is not installed")
    if node.get("_partial_") is not True:
        c.fail(
            f"{key}._partial_",
            node.get("_partial_"),
            "must be true (the stage passes the parameters / optimizer)",
        )


def _check_stage(c: _Checker) -> None:
    number = c.int_("stage.number")
    if number is not None and number not in STAGES:
        c.fail("stage.number", number, f"must be one of {list(STAGES)}")
    module = c.str_("stage.module._target_")
    if module:
        try:
            cls = import_object(module)
            if getattr(cls, "stage", None) != number:
                c.fail(
                    "stage.module._target_",
                    module,
                    f"is the module of stage {getattr(cls, 'stage', '?')}, not {number}",
                )
        except (ImportError, AttributeError, ValueError) as e:
            c.fail("stage.module._target_", module, f"can not be imported ({e})")
    if c.get("stage.module._partial_") is not True:
        c.fail(
            "stage.module._partial_",
            c.get("stage.module._partial_"),
            "must be true (train.py passes the model and the bundle)",
        )
    c.str_("stage.objective", OBJECTIVES)
    c.int_("stage.batch_size", 1)
    c.float_("stage.optim.lr", 0.0, lo_open=True, hi=None)
    c.float_("stage.optim.weight_decay", 0.0, hi=None)
    c.float_("stage.optim.warmup_ratio", 0.0, 1.0)
    if c.get("stage.global_batch_size") is not None:
        c.int_("stage.global_batch_size", 1)
    for key in ("stage.optim.optimizer", "stage.optim.scheduler"):
        _check_partial(c, key)
    loss = c.mapping("stage.loss")
    for term in loss or {}:
        if term == "align_by_modality":  # per-modality weights of the alignment term
            for m, w in (c.mapping("stage.loss.align_by_modality") or {}).items():
                if m not in modality_registry.names():
                    c.fail(
                        f"stage.loss.align_by_modality.{m}",
                        w,
                        f"unknown modality; registered: {modality_registry.names()}",
                    )
                else:
                    c.float_(f"stage.loss.align_by_modality.{m}", 0.0, hi=None)
        elif term == "logits_chunk":  # the caption loss in chunks of this many labelled positions
            if loss and loss[term] is not None:
                c.int_("stage.loss.logits_chunk", 1)
        elif term not in LOSS_TERMS:
            c.fail(f"stage.loss.{term}", (loss or {})[term], f"unknown loss term; known: {list(LOSS_TERMS)}")
        else:
            c.float_(f"stage.loss.{term}", 0.0, hi=None)


def _check_model(c: _Checker) -> list[str]:
    c.str_("model.name")
    c.str_("model.llm.path")
    c.str_("model.llm.dtype", DTYPES)

    c.str_("model.llm.template", TEMPLATES)
    attn = c.get("model.llm.attn_implementation")
    if (
        attn is not None
        and c.str_("model.llm.attn_implementation", ATTN_IMPLEMENTATIONS) == "flash_attention_2"
    ):
        if importlib.util.find_spec("flash_attn") is None:
            c.fail(
                "model.llm.attn_implementation",
                attn,
                "needs the flash-attn package, which is not installed; use sdpa",
            )
    if c.get("model.llm.compile") not in (None, True, False):
        c.fail("model.llm.compile", c.get("model.llm.compile"), "must be true or false")
    if c.get("model.llm.compile") and c.get("model.llm.compile_backend") is not None:
        import torch._dynamo  # deferred: torch._dynamo costs ~1 s; only model.llm.compile_backend needs it

        c.str_("model.llm.compile_backend", torch._dynamo.list_backends(exclude_tags=()))
    if c.get("model.llm.activation_checkpointing") not in (None, True, False):
        c.fail(
            "model.llm.activation_checkpointing",
            c.get("model.llm.activation_checkpointing"),
            "must be true or false",
        )
    c.str_("model.encoder.checkpoint")
    c.str_("model.encoder.dtype", DTYPES)
    if c.get("model.encoder.renormalize") not in (None, True, False):
        c.fail("model.encoder.renormalize", c.get("model.encoder.renormalize"), "must be true or false")
    arch = c.mapping("model.encoder.arch")
    if arch is not None:
        try:
            plain = OmegaConf.to_container(arch) if isinstance(arch, DictConfig) else dict(arch)
            ImageBindConfig.from_dict(cast(dict[str, Any], plain))
        except (ValueError, TypeError, KeyError) as e:
            c.fail(
                "model.encoder.arch",
                OmegaConf.to_container(arch) if isinstance(arch, DictConfig) else arch,
                str(e),
            )
    c.int_("model.input_projector.num_tokens", 1)
    d_model = c.int_("model.output_projector.d_model", 1)
    nhead = c.int_("model.output_projector.nhead", 1)
    if d_model and nhead and d_model % nhead:
        c.fail("model.output_projector.nhead", nhead, f"must divide d_model={d_model}")
    for k in ("num_encoder_layers", "num_decoder_layers", "dim_feedforward"):
        c.int_(f"model.output_projector.{k}", 1)
    c.float_("model.output_projector.dropout", 0.0, 1.0)
    if c.get("model.output_projector.norm_first") not in (None, True, False):
        c.fail(
            "model.output_projector.norm_first",
            c.get("model.output_projector.norm_first"),
            "must be true or false",
        )
    if c.get("model.output_projector.query_std") is not None:
        c.float_("model.output_projector.query_std", 0.0, hi=None)  # 0: zero queries (the current code)
    c.int_("model.lora.r", 1)
    c.float_("model.lora.alpha", 0.0, lo_open=True, hi=None)
    c.float_("model.lora.dropout", 0.0, 1.0)
    if c.get("model.lora.target_modules") not in (
        "all-linear",
        "attention",
    ):  # peft's / derived (nextgpt/lora.py)
        targets = c.sequence("model.lora.target_modules")
        for i, t in enumerate(targets or []):
            if not isinstance(t, str) or not t:
                c.fail(f"model.lora.target_modules[{i}]", t, "must be a module name")

    if c.get("model.markers") is not None:
        c.str_("model.markers", MARKER_STYLES)
    if c.get("model.generation") is not None:  # decoding defaults of python -m nextgpt.generate
        if c.get("model.generation.max_new_tokens") is not None:
            c.int_("model.generation.max_new_tokens", 1)
        if c.get("model.generation.temperature") is not None:
            c.float_("model.generation.temperature", 0.0, None)
        if c.get("model.generation.top_p") is not None:
            c.float_("model.generation.top_p", 0.0, 1.0, lo_open=True, hi_open=False)
    if c.get("model.vocab_rows") is not None:
        c.str_("model.vocab_rows", VOCAB_ROWS)
    mods = c.mapping("model.modalities") or {}
    if not mods:
        c.fail("model.modalities", mods, "must name at least one modality")
    known = modality_registry.names()
    for name in mods:
        key = f"model.modalities.{name}"
        if name not in known:
            c.fail(key, name, f"unknown modality; registered: {known}")
            continue
        if c.get(f"{key}.decoder") is None:  # input-only: read, never generated
            if c.get(f"{key}.num_signal_tokens") not in (0, None):
                c.fail(
                    f"{key}.num_signal_tokens",
                    c.get(f"{key}.num_signal_tokens"),
                    "must be 0 for an input-only modality (decoder: null): nothing decodes its signal tokens",
                )
            continue
        c.int_(f"{key}.num_signal_tokens", 1)
        c.str_(f"{key}.decoder.path")
        c.str_(f"{key}.decoder.conditioning", tuple(COMPONENTS))
        c.str_(f"{key}.decoder.dtype", DTYPES)
        c.mapping(f"{key}.decoder.generate")
        c.mapping(f"{key}.decoder.save")
        denoise = c.get(f"{key}.decoder.denoise")
        if denoise is not None and not isinstance(denoise, bool):
            c.fail(f"{key}.decoder.denoise", denoise, "must be true or false")
        elif denoise and modality_registry.get(name).target_loader is None:
            c.fail(
                f"{key}.decoder.denoise", denoise, f"no denoising-loss target loader for {name!r} media yet"
            )
    return [m for m in mods if m in known]


def _check_dataset(c: _Checker, model_modalities: list[str]) -> None:
    c.str_("dataset.name")
    c.int_("dataset.batch_size", 1)
    c.int_("dataset.max_length", 16)
    c.int_("dataset.num_workers", 0)
    c.float_("dataset.val_fraction", 0.0, 1.0)
    if c.get("dataset.pack") not in (None, True, False):
        c.fail("dataset.pack", c.get("dataset.pack"), "must be true or false")

    c.str_("dataset.template", TEMPLATES)
    if c.get("dataset.pairs") is not None:
        c.str_("dataset.pairs.style", PAIR_STYLES)
        c.str_("dataset.pairs.caption_prompt")
        if not isinstance(c.get("dataset.pairs.clean_captions"), bool):
            c.fail(
                "dataset.pairs.clean_captions", c.get("dataset.pairs.clean_captions"), "must be true or false"
            )
    loader = c.get("dataset.loader") or "json"
    if loader not in LOADERS:
        c.fail("dataset.loader", loader, f"must be one of {list(LOADERS)}")
    sources = c.sequence("dataset.sources") or []
    for i, src in enumerate(sources):
        key = f"dataset.sources[{i}]"
        c.str_(f"{key}.name")
        if loader == "shards" and "urls" in src:
            c.str_(f"{key}.urls")  # a missing ${dataset.urls} is reported by name
        else:
            c.str_(f"{key}.root")
        weight = src.get("weight", 1)
        if isinstance(weight, bool) or not isinstance(weight, int) or weight < 1:
            c.fail(f"{key}.weight", weight, "must be a positive integer (passes over the source per epoch)")
        fmt = src.get("format") or "nextgpt"
        if fmt not in SOURCE_FORMATS:
            c.fail(f"{key}.format", fmt, f"must be one of {list(SOURCE_FORMATS)}")
        elif fmt != "nextgpt":
            c.str_(f"{key}.file")  # the original's JSON file; its media names are relative to root
            if loader != "json":
                c.fail(f"{key}.format", fmt, "the original's stage-3 files are read by dataset.loader=json")
        mod = c.str_(f"{key}.modality")
        if mod and mod not in modality_registry.names():
            c.fail(f"{key}.modality", mod, f"unknown modality; registered: {modality_registry.names()}")
        elif mod and mod not in model_modalities:
            how = (
                f"+model.modalities.{mod}={{num_signal_tokens: 0, decoder: null}} reads it as an input-only modality"
                if not modality_registry.get(mod).default_num_signal_tokens
                else f"add model.modalities.{mod}"
            )
            c.fail(f"{key}.modality", mod, f"not among the model's modalities {model_modalities} ({how})")
    if c.get("dataset.mix") is not None:
        c.str_("dataset.mix", ("weighted", "balanced"))
    if c.get("dataset.source_changed") is not None:
        c.str_("dataset.source_changed", ("rewrite", "error", "keep"))
    if c.get("dataset.media_identity") is not None:
        c.str_("dataset.media_identity", ("listing", "none"))
    if c.get("dataset.max_skip_fraction") is not None:
        c.float_("dataset.max_skip_fraction", 0.0, 1.0, hi_open=False)
    fc = c.get("dataset.feature_cache")
    if fc is not None and not isinstance(fc, bool):
        c.fail("dataset.feature_cache", fc, "must be true or false")
    if c.get("dataset.synthetic") is not None:
        c.str_("dataset.synthetic.root")
        c.int_("dataset.synthetic.num_per_modality", 1)
        c.int_("dataset.synthetic.seed", 0)


def _check_strategy(c: _Checker) -> None:
    strategy = c.get("trainer.strategy")
    if isinstance(strategy, str):
        if strategy not in STRATEGY_NAMES:
            c.fail("trainer.strategy", strategy, f"unknown strategy; known: {list(STRATEGY_NAMES)}")
    elif isinstance(strategy, (dict, DictConfig)):
        target = strategy.get("_target_")
        if target not in STRATEGY_TARGETS:
            c.fail("trainer.strategy._target_", target, f"must be one of {list(STRATEGY_TARGETS)}")
        optimizer = c.get("stage.optim.optimizer._target_")
        if (
            target == "lightning.pytorch.strategies.DeepSpeedStrategy"
            and strategy.get("offload_optimizer")
            and optimizer not in DEEPSPEED_CPU_OPTIMIZERS
        ):
            c.fail(
                "stage.optim.optimizer._target_",
                optimizer,
                "DeepSpeed refuses a torch optimizer when trainer.strategy.offload_optimizer=true; use "
                "optimizer=deepspeed_cpu_adam (or one of " + ", ".join(DEEPSPEED_CPU_OPTIMIZERS) + ")",
            )
    else:
        c.fail("trainer.strategy", strategy, "must be a strategy name or a _target_ mapping")


def _check_trainer(c: _Checker) -> None:
    for key, lo in (
        ("trainer.max_steps", -1),
        ("trainer.accumulate_grad_batches", 1),
        ("trainer.num_nodes", 1),
        ("trainer.log_every_n_steps", 1),
    ):
        if c.get(key) is not None:
            c.int_(key, lo)
    if c.get("trainer.max_epochs") is not None:
        c.int_("trainer.max_epochs", -1)
    steps, epochs = c.get("trainer.max_steps"), c.get("trainer.max_epochs")
    if steps == 0 or epochs == 0:
        c.fail(
            "trainer.max_steps" if steps == 0 else "trainer.max_epochs",
            0,
            "a run of 0 steps would train nothing",
        )
    clip = c.get("trainer.gradient_clip_val")
    if clip is not None:
        c.float_("trainer.gradient_clip_val", 0.0, hi=None)
    overfit = c.get("trainer.overfit_batches")
    if overfit and c.get("dataset.loader") == "shards":
        c.fail(
            "trainer.overfit_batches",
            overfit,
            "a shard stream runs on across epochs and never repeats a batch; "
            "overfit on a dataset read from the NExT-GPT layout (dataset=synthetic, or a base/json dataset)",
        )


# loggers whose package is an optional extra: the packages any one of which they need, and the extra
OPTIONAL_LOGGERS = {"TensorBoardLogger": (("tensorboard", "tensorboardX"), "pip install -e .[tensorboard]")}


def _check_loggers(c: _Checker) -> None:
    """A logger whose package is not installed is named before anything loads (Lightning would
    fail when the trainer is built, after the data and the model)."""
    for name, node in (c.mapping("logger") or {}).items():
        if not isinstance(node, Mapping) or "_target_" not in node:
            continue
        cls = str(node["_target_"]).rpartition(".")[2]
        if cls in OPTIONAL_LOGGERS:
            packages, how = OPTIONAL_LOGGERS[cls]
            if not any(importlib.util.find_spec(p) is not None for p in packages):
                c.fail(
                    f"logger.{name}._target_",
                    node["_target_"],
                    f"needs {' or '.join(packages)}, not installed ({how})",
                )


def validate(cfg: DictConfig) -> None:
    """Check every key a run uses; raise ``ConfigError`` listing all faults. Loads nothing."""
    c = _Checker(cfg, [])
    _check_stage(c)
    mods = _check_model(c)
    _check_dataset(c, mods)
    _check_strategy(c)
    c.int_("seed", 0)
    _check_trainer(c)
    _check_loggers(c)
    resume = c.get("resume")
    if not isinstance(resume, (bool, str)) or (isinstance(resume, str) and not resume):
        c.fail("resume", resume, "must be true, false, or a run folder / checkpoint to continue from")
    elif isinstance(resume, str) and resume not in ("true", "false") and not Path(resume).exists():
        c.fail("resume", resume, "no such run folder or checkpoint")
    init = c.get("init_from")
    if init is not None and not isinstance(init, str):
        c.fail("init_from", init, "must be a path or null")
    for key in ("paths.bundles", "paths.checkpoints", "paths.output_dir"):
        c.str_(key)
    _check_plan(c)
    targets = {
        node: str(t)
        for node in TARGET_NODES
        if (t := OmegaConf.select(cfg, f"{node}._target_", default=None)) is not None
    }
    c.errors += appended_key_errors(targets, given_overrides(), CONFIG_DIR)
    if c.errors:
        raise ConfigError(c.errors)


def _check_plan(c: _Checker) -> None:
    if c.get("plan") is None:
        return
    for key in ("plan.check", "plan.allow_over_memory"):
        if c.get(key) not in (None, True, False):
            c.fail(key, c.get(key), "must be true or false")
    for key, hi in (("plan.device_memory_gib", None), ("plan.peak_tflops", None), ("plan.mfu", 1.0)):
        if c.get(key) is not None:
            c.float_(key, 0.0, hi=hi, lo_open=True, hi_open=False)
    if c.get("plan.seq_len") is not None:
        c.int_("plan.seq_len", 1)
