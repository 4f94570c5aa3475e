"""What a run reads and writes, checked before any weight loads: backbone folders, decoder
conditionings, LoRA targets, the previous stage's bundle and its tokens, the output folders
(``validate_paths`` raises one ``ConfigError`` listing every fault); and, under DeepSpeed, the
config DeepSpeed will be handed, checked by DeepSpeed itself (``deepspeed_preflight``)."""

from __future__ import annotations

import copy
import json
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import hydra
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from nextgpt import modality as modality_registry
from nextgpt.config import ConfigError
from nextgpt.lora import attention_projections
from nextgpt.model_spec import ModelSpec, conditioning_mismatch
from nextgpt.spec import PathsSpec, RunSpec


def backbone_path_errors(model: ModelSpec) -> list[str]:
    """Missing backbone folders and checkpoints, and an LLM folder that holds no causal LM (checked
    after the tiny backbones are built, so a path pointed elsewhere is checked too)."""
    checks: list[tuple[str, str, str | None]] = [
        ("model.llm.path", model.llm.path, "config.json"),
        ("model.encoder.checkpoint", model.encoder.checkpoint, None),
    ]
    checks += [
        (f"model.modalities.{n}.decoder.path", dec.path, "model_index.json")
        for n, dec in model.generated.items()
    ]
    errors = []
    for key, path, inner in checks:
        target = Path(path) / inner if inner else Path(path)
        if not target.exists():
            errors.append(f"{key}={path!r}: {target} does not exist")
    errors += decoder_conditioning_errors(model)
    llm_config = Path(model.llm.path) / "config.json"
    if llm_config.is_file():
        found = _causal_lm_errors(llm_config)
        errors += found or lora_target_errors(model.llm.path, model.need_lora().target_modules)
        if model.llm.template == "chat" and not _has_chat_template(Path(model.llm.path)):
            errors.append(
                f"model.llm.template='chat': the tokenizer in {model.llm.path} has no chat template "
                "(tokenizer_config.json chat_template, or chat_template.jinja); name a template instead"
            )
    return errors


def decoder_conditioning_errors(model: ModelSpec) -> list[str]:
    """A conditioning kind that does not read its pipeline folder the way that pipeline does (SDXL's
    two encoders and pooled embedding configured as ``last_hidden_state``, say), named by key."""

    errors = []
    for n, dec in model.generated.items():
        index = Path(dec.path) / "model_index.json"
        if index.is_file():
            why = conditioning_mismatch(json.loads(index.read_text()), dec.conditioning)
            if why:
                errors.append(
                    f"model.modalities.{n}.decoder.conditioning={dec.conditioning!r}: {why} ({index})"
                )
    return errors


def _has_chat_template(folder: Path) -> bool:

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


def bundle_token_errors(model: ModelSpec, bundle: Path, key: str) -> list[str]:
    """The bundle's signal tokens against those the config asks for, before any weight loads: a
    bundle trained with 4 image and 8 audio tokens must not load into 6 + 6 (equal shapes).
    ``key``: the config key that names the bundle (``init_from`` or ``paths.bundles``)."""

    try:
        layout = json.loads((bundle / "meta.json").read_text(encoding="utf-8")).get("token_layout")
    except (ValueError, UnicodeDecodeError) as e:
        return [f"{key}={str(bundle)!r}: {bundle / 'meta.json'} is damaged ({e})"]
    if not layout:
        return []
    errors = []
    for name, m in model.modalities.items():
        want = modality_registry.get(name).signal_tokens(m.num_signal_tokens)
        have = list(layout["signals"].get(name, {}))
        if want != have:
            errors.append(
                f"model.modalities.{name}.num_signal_tokens={m.num_signal_tokens}: the bundle {bundle} was "
                f"trained with {len(have)} {name} signal tokens ({' '.join(have[:2])}{' ...' if len(have) > 2 else ''})"
                f", this config asks for {len(want)} ({' '.join(want[:2])}{' ...' if len(want) > 2 else ''})"
            )
    return errors


OUTPUT_KEYS = ("paths.bundles", "paths.checkpoints")  # folders a run writes its results into


def unwritable_errors(paths: PathsSpec) -> list[str]:
    """Output folders that can not be created or written (found before anything loads, not after
    training)."""

    errors = []
    for key, folder in zip(OUTPUT_KEYS, (paths.bundles, paths.checkpoints), strict=True):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=folder).close()
        except OSError as e:
            errors.append(
                f"{key}={str(folder)!r}: can not be written ({e.strerror or e}); the run would train and then "
                "lose its result"
            )
    return errors


def validate_paths(spec: RunSpec, init_from: str | None, data_errors: Iterable[str] = ()) -> None:
    """Check that everything the run reads exists, naming the key and the path when not.
    The bundle this stage starts from is ``spec.init_from``: ``init_from`` (the config's key) when
    given, else the previous stage's under ``paths.bundles``; ``data_errors``: what the data side
    found missing (the data module's ``path_errors()``)."""
    errors = list(data_errors) + backbone_path_errors(spec.model)
    bundle = spec.init_from
    key = "init_from" if init_from else "paths.bundles"
    if bundle is not None and (Path(bundle) / "meta.json").is_file():
        errors += bundle_token_errors(spec.model, Path(bundle), key)
    if bundle is not None and not (Path(bundle) / "trainable.safetensors").is_file():
        errors.append(
            f"{key}={init_from or str(spec.paths.bundles)!r}: stage {spec.stage.number} starts from the bundle "
            f"{bundle}, which does not exist (run the previous stage first, or set init_from=DIR)"
        )
    if errors:
        raise ConfigError(errors)


def deepspeed_preflight(strategy: DeepSpeedStrategy, precision: str, spec: RunSpec) -> dict[str, Any]:
    """The DeepSpeed config a run will hand DeepSpeed (``strategy``: ``trainer.strategy``
    instantiated; ``precision``: ``trainer.precision``), checked by DeepSpeed itself (its
    ``DeepSpeedConfig``) together with the optimizer ``stage.optim.optimizer`` picks, before any
    weight loads. Raises ``ConfigError`` naming the keys at fault; returns the config."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam  # deferred: deepspeed is optional and ~1 s to import
    from deepspeed.ops.lion import DeepSpeedCPULion  # deferred: deepspeed is optional and ~1 s to import
    from deepspeed.runtime.config import DeepSpeedConfig  # deferred: deepspeed is optional and ~1 s to import

    config: dict[str, Any] = copy.deepcopy(strategy.config or {})  # Lightning always sets it
    # what Lightning adds when the run starts (DeepSpeedStrategy._format_config)
    config["train_micro_batch_size_per_gpu"] = spec.batch.per_device
    config["gradient_accumulation_steps"] = spec.batch.accumulate
    if precision.startswith("bf16"):
        config["bf16"] = {"enabled": True}
    elif precision.startswith("16"):
        config["fp16"] = {
            "enabled": True,
            "loss_scale": strategy.loss_scale,
            "initial_scale_power": strategy.initial_scale_power,
            "loss_scale_window": strategy.loss_scale_window,
            "hysteresis": strategy.hysteresis,
            "min_loss_scale": strategy.min_loss_scale,
        }
    try:
        ds = DeepSpeedConfig(config)
    except Exception as e:  # pydantic / DeepSpeed's own sanity checks
        raise ConfigError([f"trainer.strategy: DeepSpeed refuses the composed config: {e}"]) from e
    target = str(spec.stage.optim.optimizer["_target_"])
    optimizer = hydra.utils.get_class(target)
    offload = ds.zero_config.offload_optimizer
    # DeepSpeedEngine._configure_optimizer's rule for a client optimizer under ZeRO-Offload
    if (
        offload is not None
        and str(getattr(offload.device, "value", offload.device)) in ("cpu", "nvme")
        and ds.zero_force_ds_cpu_optimizer
        and not issubclass(optimizer, (DeepSpeedCPUAdam, DeepSpeedCPULion))
    ):
        raise ConfigError(
            [
                f"stage.optim.optimizer._target_={target!r}: DeepSpeed refuses it with the optimizer state "
                "offloaded (trainer.strategy.offload_optimizer=true); use optimizer=deepspeed_cpu_adam"
            ]
        )
    return config
