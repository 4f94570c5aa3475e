"""``python -m nextgpt.convert from_legacy | to_legacy | to_hf key=value ... [config overrides]``.

    python -m nextgpt.convert from_legacy checkpoint=ckpt/7b_tiva_v0/pytorch_model.pt out=bundles/nextgpt_7b_tiva_v0
    python -m nextgpt.convert from_legacy checkpoint=PATH out=DIR model=tiny      # any train.py override
    python -m nextgpt.convert from_legacy checkpoint=PATH out=DIR --allow-unused  # import what maps, list the rest
    python -m nextgpt.convert to_legacy bundle=bundles/stage3 out=pytorch_model.pt
    python -m nextgpt.convert to_hf bundle=bundles/stage3 out=export/nextgpt_hf

``from_legacy`` composes the training config with ``experiment=nextgpt_legacy`` (the original's
model, markers and template) and the overrides given, builds that model (with LoRA when the
checkpoint has LoRA tensors), maps every tensor (``nextgpt.convert.legacy``) and writes a stage
bundle plus ``import_report.json``: each key mapped or skipped and why, and how far the old
vocabulary rows moved from the base LLM's. A key that maps to nothing in the model (another
layout, a modality the config lacks) stops the import with its name and no bundle is written;
``--allow-unused`` imports the rest and lists those keys as ``skipped`` in the report.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import hydra
import torch
from omegaconf import OmegaConf
from transformers import PreTrainedTokenizerBase

from nextgpt.bundles import (
    META,
    BundleMeta,
    bundle_identity,
    load_bundle_config,
    load_bundle_weights,
    save_bundle,
)
from nextgpt.config import ConfigError, compose, register_resolvers
from nextgpt.convert.hf import export_hf
from nextgpt.convert.legacy import ConvertError, from_legacy, is_legacy_key, to_legacy
from nextgpt.model import NextGPT, build_nextgpt
from nextgpt.model_spec import ModelSpec
from nextgpt.preflight import backbone_path_errors
from nextgpt.runs import RunError
from nextgpt.schema import validate
from nextgpt.stages import STAGES

log = logging.getLogger("nextgpt.convert")
COMMANDS = ("from_legacy", "to_legacy", "to_hf")
OWN_KEYS = {"from_legacy": ("checkpoint", "out"), "to_legacy": ("bundle", "out"), "to_hf": ("bundle", "out")}
FLAGS = {"from_legacy": ("--allow-unused",), "to_legacy": (), "to_hf": ()}


class UsageError(ValueError):
    pass


def parse(argv: list[str]) -> tuple[str, dict[str, str], list[str]]:
    if not argv or argv[0] not in COMMANDS:
        raise UsageError(
            f"usage: python -m nextgpt.convert {{{'|'.join(COMMANDS)}}} key=value ... "
            f"(got {argv[:1] or 'nothing'})"
        )
    command, own, overrides = argv[0], {}, []
    for arg in argv[1:]:
        key, sep, value = arg.partition("=")
        if arg in FLAGS[command]:
            own[arg.lstrip("-").replace("-", "_")] = "true"
        elif sep and key in OWN_KEYS[command]:
            own[key] = value
        elif command == "from_legacy":
            overrides.append(arg)
        else:
            raise UsageError(
                f"{command}: unknown argument {arg!r}; it takes {', '.join(k + '=' for k in OWN_KEYS[command])}"
            )
    missing = [k for k in OWN_KEYS[command] if not own.get(k)]
    if missing:
        raise UsageError(f"{command}: missing {', '.join(k + '=' for k in missing)}")
    return command, own, overrides


def import_legacy(
    checkpoint: str | Path, out: str | Path, overrides: Sequence[str] = (), *, allow_unused: bool = False
) -> Path:
    checkpoint, out = Path(checkpoint), Path(out)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint={checkpoint}: no such file (the original's pytorch_model.pt)")
    if out.exists():
        raise FileExistsError(f"out={out} exists; give a new folder (a bundle is never overwritten)")
    try:
        ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors of several kinds
        raise ValueError(f"checkpoint={checkpoint} could not be read as a tensor state dict: {e}") from e
    if not isinstance(ckpt, dict) or not all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise ValueError(f"checkpoint={checkpoint} is not a state dict of tensors")
    if not ckpt:
        raise ConvertError(f"checkpoint={checkpoint}: an empty state dict, no tensor to import")
    if not any(is_legacy_key(k) for k in ckpt):
        keys = list(ckpt)
        raise ConvertError(
            f"checkpoint={checkpoint}: none of its {len(keys)} keys "
            f"({', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''}) "
            "is in the original NExT-GPT's layout (llama_proj.*, gen_text_hidden_fcs*.0.*, llama_model.*embed_tokens / "
            "lm_head, llama_model.*.lora_A/B.weight): not the original's pytorch_model.pt"
        )
    has_lora = any(".lora_" in k for k in ckpt)
    stage = 3 if has_lora else 2
    cfg = compose(["experiment=nextgpt_legacy", f"stage={stage}", *overrides], output_dir=str(out.parent))
    validate(cfg)
    spec = ModelSpec.from_config(cfg.model)
    hydra.utils.instantiate(cfg.model.get("backbones"))  # model.backbones: tiny/world models build theirs
    errors = backbone_path_errors(
        spec
    )  # validate_paths' backbone half (its stage-bundle check is for training)
    if errors:
        raise ConfigError(errors)
    model, _, _ = build_nextgpt(spec)
    if has_lora:
        model.apply_lora(spec.need_lora())
    imported = from_legacy(ckpt, model, all_rows=spec.trains_all_rows)
    skipped = imported.report["skipped"]
    if skipped and not allow_unused:
        listed = "; ".join(f"{k}: {why}" for k, why in list(skipped.items())[:6])
        raise ConvertError(
            f"checkpoint={checkpoint}: {len(skipped)} of its {len(ckpt)} tensors map to nothing in this model "
            f"and would be lost: {listed}{'; ...' if len(skipped) > 6 else ''}. Nothing was written; "
            "fix the config (model.modalities, model.lora) or pass --allow-unused to import the rest "
            "and list these in import_report.json"
        )
    model.load_state_dict(imported.state, strict=False)
    config = cast(dict[str, Any], OmegaConf.to_container(cfg, resolve=True))
    meta: BundleMeta = {
        "stage": stage,
        "imported_from": str(checkpoint.resolve()),
        "legacy_import": {"keys": imported.report["keys"], "dtypes": imported.report["dtypes"]},
        **bundle_identity(model, spec),
    }
    save_bundle(out, None, config, meta, state=imported.state, base_rows=imported.base_rows)
    report = {k: v for k, v in imported.report.items() if k not in ("keys", "dtypes")}
    (out / "import_report.json").write_text(json.dumps(report, indent=2))
    rows = report["old_vocabulary_rows"]
    print(
        f"imported {checkpoint} -> {out} (stage {stage}): {len(report['mapped'])} keys mapped, "
        f"{len(report['skipped'])} skipped"
        + (
            f" under --allow-unused ({out / 'import_report.json'} lists them and why)"
            if report["skipped"]
            else ""
        )
    )
    if rows.get("kept"):
        print(
            f"the checkpoint's old vocabulary rows (embed: {rows['embed_rows_changed']} rows moved from the base "
            f"LLM's, max |change| {rows['embed_max_abs_change']:.3g}; head: {rows['head_rows_changed']} rows, max "
            f"{rows['head_max_abs_change']:.3g}): kept in {out / 'base_rows.safetensors'} (model.vocab_rows="
            f"{spec.vocab_rows}), so the bundle computes what the original computed"
        )
    return out


def load_bundle_model(
    bundle: str | Path,
) -> tuple[NextGPT, PreTrainedTokenizerBase, ModelSpec, BundleMeta]:
    """(model, tokenizer, model spec, meta) of a stage bundle, built and loaded as generation does."""
    bundle = Path(bundle)
    cfg = load_bundle_config(bundle)
    spec = ModelSpec.from_config(cfg.model)
    model, tokenizer, _ = build_nextgpt(spec)
    if STAGES[int(cfg.stage.number)].use_lora:
        model.apply_lora(spec.need_lora())
    load_bundle_weights(bundle, model, spec)
    meta: BundleMeta = json.loads((bundle / META).read_text()) if (bundle / META).is_file() else {}
    return model.eval(), tokenizer, spec, meta


def export_legacy(bundle: str | Path, out: str | Path) -> Path:
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"out={out} exists; give a new file name")
    model, _, _, meta = load_bundle_model(bundle)
    legacy = meta.get("legacy_import") or {}
    ckpt = to_legacy(model, legacy.get("keys"), legacy.get("dtypes"))
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, out)
    print(f"wrote {out}: {len(ckpt)} tensors in the original's layout")
    return out


def export_to_hf(bundle: str | Path, out: str | Path) -> Path:
    model, tokenizer, spec, meta = load_bundle_model(bundle)
    path = export_hf(model, tokenizer, spec, meta, out)
    print(
        f"wrote {path}: llm/ (LoRA merged, vocabulary {model.layout.vocab_size}), "
        f"nextgpt_projectors.safetensors, README.md"
    )
    return path


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    register_resolvers()
    try:
        command, own, overrides = parse(list(sys.argv[1:] if argv is None else argv))
        if command == "from_legacy":
            import_legacy(
                own["checkpoint"], own["out"], overrides, allow_unused=own.get("allow_unused") == "true"
            )
        elif command == "to_legacy":
            export_legacy(own["bundle"], own["out"])
        else:
            export_to_hf(own["bundle"], own["out"])
    except (
        UsageError,
        ConfigError,
        ConvertError,
        RunError,
        FileNotFoundError,
        FileExistsError,
        ValueError,
    ) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
