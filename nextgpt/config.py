"""The typed schema of a composed config, checked before any weight loads.

``validate`` checks types and ranges of everything a run uses and raises one ``ConfigError``
listing every fault as ``key=value: reason``. ``validate_paths`` then checks that what the run
reads exists (data JSON files, backbone folders, the previous stage's bundle).
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from nextgpt import modality as modality_registry
from nextgpt.overrides import appended_key_errors

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
STAGES = (1, 2, 3)
OBJECTIVES = ("caption", "generate", "instruct")
DTYPES = ("float32", "float16", "bfloat16")
CONDITIONINGS = ("last_hidden_state", "text_embeds", "sdxl")  # nextgpt.decoders.CONDITIONINGS
LOSS_TERMS = ("ce", "align", "denoise")
LOADERS = ("json", "shards")
# dataset.sources[i].format: the NExT-GPT folder layout, or one of the original's stage-3 files
# (datamodules/original_formats.py)
SOURCE_FORMATS = ("nextgpt", "t2x", "llava", "alpaca", "mosit")
STRATEGY_NAMES = (
    "auto",
    "ddp",
    "ddp_spawn",
    "ddp_find_unused_parameters_true",
    "fsdp",
    "deepspeed",
    "deepspeed_stage_1",
    "deepspeed_stage_2",
    "deepspeed_stage_2_offload",
    "deepspeed_stage_3",
    "deepspeed_stage_3_offload",
    "single_device",
)
STRATEGY_TARGETS = (
    "lightning.pytorch.strategies.DDPStrategy",
    "nextgpt.strategies.FSDP2Strategy",
    "lightning.pytorch.strategies.DeepSpeedStrategy",
    "lightning.pytorch.strategies.SingleDeviceStrategy",
)
# what DeepSpeed accepts when ZeRO offloads the optimizer state (it refuses a torch optimizer there)
DEEPSPEED_CPU_OPTIMIZERS = (
    "deepspeed.ops.adam.DeepSpeedCPUAdam",
    "deepspeed.ops.adagrad.DeepSpeedCPUAdagrad",
    "deepspeed.ops.lion.DeepSpeedCPULion",
)
IMAGEBIND_PRESETS = ("huge", "tiny")


class ConfigError(ValueError):
    """A composed config that can not run. ``errors`` lists ``key=value: reason`` lines."""

    def __init__(self, errors: list[str]):
        self.errors = errors
        super().__init__("invalid config:\n  " + "\n  ".join(errors))


# --- Hydra plumbing ------------------------------------------------------------------------
def launch_rank() -> int:
    """This process's global rank as its launcher set it (torchrun, srun, Lightning's own), before
    any process group exists; 0 without one."""
    for var in ("RANK", "SLURM_PROCID", "PMI_RANK", "OMPI_COMM_WORLD_RANK"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    local, node = (
        os.environ.get("LOCAL_RANK", ""),
        os.environ.get("NODE_RANK", os.environ.get("GROUP_RANK", "0")),
    )
    if local.isdigit():
        # Lightning's launcher starts local ranks with LOCAL_RANK / NODE_RANK / WORLD_SIZE only
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "0") or 0)
        return int(local) + int(node) * per_node if per_node and node.isdigit() else int(local)
    return 0


def _sweep_group(default: str) -> str:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return f"sweep-{Path(HydraConfig.get().sweep.dir).name}"
    return str(default)


def _per_stage(mapping: Any, number: Any) -> Any:
    """``mapping[str(number)]``: a number or string as it is, a mapping as a config; {} when absent."""
    entry = mapping.get(str(number)) if mapping is not None else None
    if entry is None:
        return OmegaConf.create({})
    return OmegaConf.create(OmegaConf.to_container(entry)) if isinstance(entry, DictConfig) else entry


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("nextgpt.cwd"):
        # the launch directory; unlike ${hydra:runtime.cwd} it also resolves in hydra.sweep.dir
        OmegaConf.register_new_resolver("nextgpt.cwd", os.getcwd)
    if not OmegaConf.has_resolver("nextgpt.rank_suffix"):
        # "" on global rank 0 (and without a launcher), "_rank<N>" elsewhere: per-process file names
        OmegaConf.register_new_resolver(
            "nextgpt.rank_suffix", lambda: "" if launch_rank() == 0 else f"_rank{launch_rank()}"
        )
    if not OmegaConf.has_resolver("nextgpt.sweep_group"):
        # a multirun's jobs share one W&B group (the sweep folder's name); otherwise the default given
        OmegaConf.register_new_resolver("nextgpt.sweep_group", _sweep_group)
    if not OmegaConf.has_resolver("nextgpt.tagged"):
        # "<name>-<tag>" (a sweep job's swept values), or the name alone
        OmegaConf.register_new_resolver(
            "nextgpt.tagged", lambda name, tag="": f"{name}-{tag}" if tag else str(name)
        )
    if not OmegaConf.has_resolver("nextgpt.per_stage"):
        # ${nextgpt.per_stage:${a_mapping},${stage.number}}: the mapping's entry for this stage
        # ("1"/"2"/"3"); {} where it has none. A recipe whose value differs by stage.
        OmegaConf.register_new_resolver("nextgpt.per_stage", _per_stage)
    if not OmegaConf.has_resolver("nextgpt.wandb_offline"):
        # offline unless an API key is set or the user asked for online mode
        OmegaConf.register_new_resolver(
            "nextgpt.wandb_offline",
            lambda: not (os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE") == "online"),
        )


_STAGE_ARG = re.compile(r"^(?P<prefix>[+~]{0,2})stage=(?P<value>\d+(?:,\d+)*)$")


def normalize_overrides(args: Iterable[str]) -> list[str]:
    """``stage=2`` -> ``stage='2'`` and ``stage=1,2,3`` -> ``stage='1','2','3'``.

    ``stage`` is a config group whose options are named 1, 2, 3; Hydra 1.3 parses an unquoted
    ``2`` as an int and refuses it as a group choice. Quoting keeps the user's literal command
    working (and ``stage=4`` still fails with Hydra's "Could not find 'stage/4'").
    """
    out = []
    for arg in args:
        m = _STAGE_ARG.match(arg)
        if m:
            arg = f"{m['prefix']}stage=" + ",".join(f"'{v}'" for v in m["value"].split(","))
        out.append(arg)
    return out


def compose(
    overrides: Iterable[str] = (), config_name: str = "train", *, output_dir: str | None = None
) -> DictConfig:
    """Compose a config outside a Hydra app (tests, tools), with ``hydra:`` interpolations set."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name, overrides=normalize_overrides(overrides), return_hydra_config=True)
    OmegaConf.set_readonly(cfg.hydra, False)
    cfg.hydra.runtime.output_dir = output_dir or os.getcwd()
    cfg.hydra.runtime.cwd = os.getcwd()
    HydraConfig.instance().set_config(cfg)
    OmegaConf.set_struct(cfg, False)
    cfg.pop("hydra")
    return cfg


# the LLM's attention kernels (transformers' attn_implementation); null: transformers' default
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")

# --- schema --------------------------------------------------------------------------------
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
    import importlib.util

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
            if loss[term] is not None:
                c.int_("stage.loss.logits_chunk", 1)
        elif term not in LOSS_TERMS:
            c.fail(f"stage.loss.{term}", loss[term], f"unknown loss term; known: {list(LOSS_TERMS)}")
        else:
            c.float_(f"stage.loss.{term}", 0.0, hi=None)


def _check_model(c: _Checker) -> list[str]:
    c.str_("model.name")
    c.str_("model.llm.path")
    c.str_("model.llm.dtype", DTYPES)
    from nextgpt.prompts import TEMPLATES

    c.str_("model.llm.template", TEMPLATES)
    attn = c.get("model.llm.attn_implementation")
    if (
        attn is not None
        and c.str_("model.llm.attn_implementation", ATTN_IMPLEMENTATIONS) == "flash_attention_2"
    ):
        import importlib.util

        if importlib.util.find_spec("flash_attn") is None:
            c.fail(
                "model.llm.attn_implementation",
                attn,
                "needs the flash-attn package, which is not installed; use sdpa",
            )
    if c.get("model.llm.compile") not in (None, True, False):
        c.fail("model.llm.compile", c.get("model.llm.compile"), "must be true or false")
    if c.get("model.llm.compile") and c.get("model.llm.compile_backend") is not None:
        import torch._dynamo

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
            from nextgpt.encoders.imagebind import ImageBindConfig

            ImageBindConfig.from_dict(
                OmegaConf.to_container(arch) if isinstance(arch, DictConfig) else dict(arch)
            )
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
    from nextgpt.tokens import MARKER_STYLES, VOCAB_ROWS

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
        c.str_(f"{key}.decoder.conditioning", CONDITIONINGS)
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
    from nextgpt.prompts import TEMPLATES

    c.str_("dataset.template", TEMPLATES)
    if c.get("dataset.pairs") is not None:
        from nextgpt.prompts import PAIR_STYLES

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
    c.errors += appended_key_errors(cfg, given_overrides(), CONFIG_DIR)
    if c.errors:
        raise ConfigError(c.errors)


def given_overrides() -> list[str]:
    """The command line's overrides of this Hydra job (or of ``compose``); none outside Hydra."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


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


# --- batch plan ----------------------------------------------------------------------------
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
            f"world size {self.world_size} ({self.devices} device(s) x {self.num_nodes} node(s)), per-device batch "
            f"{self.per_device}, gradient accumulation {self.accumulate}, global batch {self.global_batch}"
        )


def device_count(devices: Any, accelerator: Any) -> int:
    """Processes per node that Lightning starts for ``trainer.devices`` on ``trainer.accelerator``."""
    if isinstance(devices, (list, tuple, ListConfig)):
        return len(devices)
    if isinstance(devices, str) and devices not in ("auto", "-1"):
        parts = [d for d in devices.split(",") if d.strip()]
        return len(parts) if len(parts) > 1 or devices.endswith(",") else int(devices)
    if devices in ("auto", -1, "-1"):
        if str(accelerator) in ("gpu", "cuda", "auto"):
            import torch

            return max(1, torch.cuda.device_count()) if torch.cuda.is_available() else 1
        return 1
    return int(devices)


def resolve_batch(cfg: DictConfig) -> BatchPlan:
    """Derive ``trainer.accumulate_grad_batches`` from ``stage.global_batch_size`` when it is set,
    and say how the global batch is made. Raises ``ConfigError`` (before anything loads) when the
    numbers do not divide, or contradict an explicit accumulation."""
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
    if wanted is not None:
        per_step = devices * nodes * per_device
        if wanted % per_step:
            raise ConfigError(
                [
                    f"stage.global_batch_size={wanted}: must be a multiple of devices x nodes x dataset.batch_size = "
                    f"{devices} x {nodes} x {per_device} = {per_step} (the accumulation is global / that)"
                ]
            )
        derived = wanted // per_step
        if accumulate not in (1, derived):
            raise ConfigError(
                [
                    f"trainer.accumulate_grad_batches={accumulate}: contradicts "
                    f"stage.global_batch_size={wanted}, which "
                    f"needs {derived} with {devices} x {nodes} x {per_device}; set only one of them"
                ]
            )
        accumulate = derived
        cfg.trainer.accumulate_grad_batches = accumulate
    return BatchPlan(devices, nodes, per_device, accumulate)


# --- paths ---------------------------------------------------------------------------------
def previous_bundle(cfg: DictConfig) -> str | None:
    """The bundle this stage starts from: ``init_from``, or ``${paths.bundles}/stage<N-1>`` (in a
    sweep job, that of the job's own chain: ``${paths.bundles}/<sweep tag>/stage<N-1>``)."""
    if cfg.init_from:
        return str(cfg.init_from)
    if int(cfg.stage.number) == 1:
        return None
    tag = OmegaConf.select(cfg, "run.tag", default="") or ""
    return str(Path(cfg.paths.bundles) / tag / f"stage{int(cfg.stage.number) - 1}")


def backbone_path_errors(cfg: DictConfig) -> list[str]:
    """Missing backbone folders and checkpoints, and an LLM folder that holds no causal LM (checked
    after the tiny backbones are built, so a path pointed elsewhere is checked too)."""
    checks = [
        ("model.llm.path", cfg.model.llm.path, "config.json"),
        ("model.encoder.checkpoint", cfg.model.encoder.checkpoint, None),
    ]
    checks += [
        (f"model.modalities.{n}.decoder.path", m.decoder.path, "model_index.json")
        for n, m in modality_registry.generated(cfg.model.modalities).items()
    ]
    errors = []
    for key, path, inner in checks:
        target = Path(path) / inner if inner else Path(path)
        if not target.exists():
            errors.append(f"{key}={path!r}: {target} does not exist")
    errors += decoder_conditioning_errors(cfg)
    llm_config = Path(cfg.model.llm.path) / "config.json"
    if llm_config.is_file():
        found = _causal_lm_errors(llm_config)
        errors += found or lora_target_errors(cfg.model.llm.path, cfg.model.lora.target_modules)
        if cfg.model.llm.template == "chat" and not _has_chat_template(Path(cfg.model.llm.path)):
            errors.append(
                f"model.llm.template='chat': the tokenizer in {cfg.model.llm.path} has no chat template "
                "(tokenizer_config.json chat_template, or chat_template.jinja); name a template instead"
            )
    return errors


def decoder_conditioning_errors(cfg: DictConfig) -> list[str]:
    """A conditioning kind that does not read its pipeline folder the way that pipeline does (SDXL's
    two encoders and pooled embedding configured as ``last_hidden_state``, say), named by key."""
    import json

    from nextgpt.decoders import conditioning_mismatch

    errors = []
    for n, m in modality_registry.generated(cfg.model.modalities).items():
        index = Path(m.decoder.path) / "model_index.json"
        if index.is_file():
            why = conditioning_mismatch(json.loads(index.read_text()), str(m.decoder.conditioning))
            if why:
                errors.append(
                    f"model.modalities.{n}.decoder.conditioning={m.decoder.conditioning!r}: {why} ({index})"
                )
    return errors


def _has_chat_template(folder: Path) -> bool:
    import json

    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    config = folder / "tokenizer_config.json"
    try:
        return bool(config.is_file() and json.loads(config.read_text(encoding="utf-8")).get("chat_template"))
    except (ValueError, UnicodeDecodeError):
        return False


def lora_target_errors(llm_path: str | Path, targets: Any) -> list[str]:
    """LoRA targets that match no module of the LLM, found from its config alone (the model is
    built on the meta device: no weight is read). peft matches a name by its last components."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(llm_path))
        with torch.device("meta"):
            llm = AutoModelForCausalLM.from_config(config)
    except Exception as e:  # an unreadable or unsupported config: the loader reports it with its own words
        return [
            f"model.llm.path={str(llm_path)!r}: its config does not build a causal LM ({type(e).__name__}: {e})"
        ]
    head = llm.get_output_embeddings()
    linear = sorted({n for n, m in llm.named_modules() if isinstance(m, torch.nn.Linear) and m is not head})
    kinds = sorted({n.rsplit(".", 1)[-1] for n in linear})
    conv1d = sorted({n.rsplit(".", 1)[-1] for n, m in llm.named_modules() if type(m).__name__ == "Conv1D"})
    if isinstance(targets, str):
        if targets == "all-linear":
            return (
                []
                if linear or conv1d
                else [f"model.lora.target_modules='all-linear': {config.model_type} has no linear layer"]
            )
        if targets == "attention":
            from nextgpt.lora import attention_projections

            return (
                []
                if attention_projections(llm)
                else [
                    f"model.lora.target_modules='attention': {config.model_type} has no attention "
                    f"block with linear layers; "
                    f"its linear layers are {kinds + conv1d} (name some of those, or all-linear)"
                ]
            )
        targets = [targets]
    names = [n for n, _ in llm.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if not missing:
        return []
    return [
        f"model.lora.target_modules={list(targets)}: {config.model_type} has no module named {missing}; its "
        f"linear layers are {kinds + conv1d} (set model.lora.target_modules to some of those, all-linear or attention)"
    ]


def _causal_lm_errors(config_file: Path) -> list[str]:
    import json

    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
    except (ValueError, UnicodeDecodeError, AttributeError) as e:
        return [f"model.llm.path={str(config_file.parent)!r}: {config_file} is not a readable config ({e})"]
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return [
            f"model.llm.path={str(config_file.parent)!r}: its config.json has model_type={model_type!r}, which is "
            "not a causal language model transformers knows (a Hugging Face LLM folder is expected)"
        ]
    return []


def bundle_token_errors(cfg: DictConfig, bundle: Path) -> list[str]:
    """The bundle's signal tokens against those the config asks for, before any weight loads: a
    bundle trained with 4 image and 8 audio tokens must not load into 6 + 6 (equal shapes)."""
    import json

    key = "init_from" if cfg.init_from else "paths.bundles"
    try:
        layout = json.loads((bundle / "meta.json").read_text(encoding="utf-8")).get("token_layout")
    except (ValueError, UnicodeDecodeError) as e:
        return [f"{key}={str(bundle)!r}: {bundle / 'meta.json'} is damaged ({e})"]
    if not layout:
        return []
    errors = []
    for name, m in cfg.model.modalities.items():
        want = modality_registry.get(name).signal_tokens(int(m.num_signal_tokens))
        have = list(layout["signals"].get(name, {}))
        if want != have:
            errors.append(
                f"model.modalities.{name}.num_signal_tokens={m.num_signal_tokens}: the bundle {bundle} was "
                f"trained with {len(have)} {name} signal tokens ({' '.join(have[:2])}{' ...' if len(have) > 2 else ''})"
                f", this config asks for {len(want)} ({' '.join(want[:2])}{' ...' if len(want) > 2 else ''})"
            )
    return errors


OUTPUT_KEYS = ("paths.bundles", "paths.checkpoints")  # folders a run writes its results into


def unwritable_errors(cfg: DictConfig) -> list[str]:
    """Output folders that can not be created or written (found before anything loads, not after
    training)."""
    import tempfile

    errors = []
    for key in OUTPUT_KEYS:
        folder = Path(OmegaConf.select(cfg, key))
        try:
            folder.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=folder).close()
        except OSError as e:
            errors.append(
                f"{key}={str(folder)!r}: can not be written ({e.strerror or e}); the run would train and then "
                "lose its result"
            )
    return errors


def validate_paths(cfg: DictConfig, data_errors: Iterable[str] = ()) -> None:
    """Check that everything the run reads exists, naming the key and the path when not.
    ``data_errors``: what the data side found missing (:func:`datamodules.sources.data_path_errors`)."""
    errors = list(data_errors) + backbone_path_errors(cfg)
    bundle = previous_bundle(cfg)
    if bundle is not None and (Path(bundle) / "meta.json").is_file():
        errors += bundle_token_errors(cfg, Path(bundle))
    if bundle is not None and not (Path(bundle) / "trainable.safetensors").is_file():
        key = "init_from" if cfg.init_from else "paths.bundles"
        errors.append(
            f"{key}={cfg.init_from or cfg.paths.bundles!r}: stage {cfg.stage.number} starts from the bundle "
            f"{bundle}, which does not exist (run the previous stage first, or set init_from=DIR)"
        )
    if errors:
        raise ConfigError(errors)


def main_guard(fn):
    """Run ``fn``; on a ConfigError (a config that can not run) or a RunError (a run that must not
    start, or that trained nothing) print it and exit 2 (no traceback: the message says it all)."""

    import functools

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except Exception as e:
            from nextgpt.runs import RunError
            from nextgpt.safeload import UnsafeFileError

            if not isinstance(e, (RunError, UnsafeFileError)):
                raise
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    return wrapped
