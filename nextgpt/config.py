"""The typed schema of a composed config, checked before any weight loads.

``validate`` checks types and ranges of everything a run uses and raises one ``ConfigError``
listing every fault as ``key=value: reason``. ``validate_paths`` then checks that what the run
reads exists (data JSON files, backbone folders, the previous stage's bundle).
"""

from __future__ import annotations

import functools
import os
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from nextgpt.runs import RunError
from nextgpt.safeload import UnsafeFileError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
STAGES = (1, 2, 3)
OBJECTIVES = ("caption", "generate", "instruct")
DTYPES = ("float32", "float16", "bfloat16")
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


def given_overrides() -> list[str]:
    """The command line's overrides of this Hydra job (or of ``compose``); none outside Hydra."""

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def main_guard(fn):
    """Run ``fn``; on a ConfigError (a config that can not run) or a RunError (a run that must not
    start, or that trained nothing) print it and exit 2 (no traceback: the message says it all)."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except Exception as e:
            if not isinstance(e, (RunError, UnsafeFileError)):
                raise
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    return wrapped
