"""Which parameters a stage trains, and stage bundles: trainable weights + the resolved config.

A bundle is ``<dir>/trainable.safetensors`` + ``<dir>/config.yaml`` + ``<dir>/meta.json``. It holds
trainable-group weights only (projectors, new-token rows, LoRA): what this stage trained and what
it carried over from earlier stages; the frozen backbones are rebuilt from the config. Stage N starts
from stage N-1's bundle, so a bundle must load into the next stage's model with every key used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file
from torch import nn

from nextgpt.atomic import building, install
from nextgpt.cache.store import file_signature
from nextgpt.gather import full_tensor
from nextgpt.model_spec import ModelSpec
from nextgpt.runs import RunError
from nextgpt.tokens import TokenLayout

if TYPE_CHECKING:
    from nextgpt.model import NextGPT

WEIGHTS, CONFIG, META = "trainable.safetensors", "config.yaml", "meta.json"
# the LLM's own vocabulary rows ("embed", "head"), only in a bundle imported from a checkpoint that
# trained them (the original NExT-GPT did): they replace the base LLM's rows when it loads
BASE_ROWS = "base_rows.safetensors"
log = logging.getLogger(__name__)


class BundleError(RunError):
    """A stage bundle that is missing, damaged, or does not fit the model (the message says why)."""


def bundle_state_dict(model: NextGPT, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """The named parameters (default: every trainable-group parameter); never a backbone weight.

    Sharded parameters (FSDP2, ZeRO-3) are gathered one at a time, only these: every rank must
    call this, and no rank ever holds more than one whole tensor beyond its shards."""
    wanted = set(names) if names is not None else None
    groups = {n for members in model.parameter_groups().values() for n in members}
    out = {}
    for n, p in model.named_parameters():
        if n not in groups:
            continue
        if wanted is None or n in wanted:
            out[n] = full_tensor(p).contiguous()
    if wanted is not None and wanted - set(out):
        raise BundleError(f"not trainable-group parameters of the model: {sorted(wanted - set(out))[:8]}")
    return out


def save_bundle(
    directory: str | Path,
    model: NextGPT | None,
    config: Mapping[str, Any],
    meta: BundleMeta,
    names: Iterable[str] | None = None,
    state: Mapping[str, torch.Tensor] | None = None,
    base_rows: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write the bundle atomically (temp dir + rename), so a crash never leaves half a bundle.

    ``names``: the parameters to keep, normally what this stage trained plus what it loaded from
    the previous bundle (a stage-1 bundle then holds no untrained output projector). ``state``:
    those tensors already gathered (``bundle_state_dict``), in place of ``model``.
    """
    directory = Path(directory)
    if state is not None:
        gathered = dict(state)
    elif model is not None:
        gathered = bundle_state_dict(model, names)
    else:
        raise TypeError("save_bundle needs the model or its gathered state")
    with building(directory, "writing") as tmp:
        _write_bundle(
            tmp,
            gathered,
            config,
            meta,
            base_rows if base_rows is not None else getattr(model, "base_rows", None),
        )
        kept = next_version(directory) if directory.exists() else None
        install(
            tmp, directory, keep_old_as=kept
        )  # a result is never silently replaced: the previous one becomes a version
    if kept is not None:
        log.warning("kept the previous bundle %s as %s", directory, kept)
    return directory


def _write_bundle(
    tmp: Path,
    state: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    meta: BundleMeta,
    base_rows: Mapping[str, torch.Tensor] | None,
) -> None:
    save_file(dict(state), str(tmp / WEIGHTS))
    if base_rows:  # carried from the bundle this model started from
        save_file({k: v.contiguous() for k, v in base_rows.items()}, str(tmp / BASE_ROWS))
    OmegaConf.save(OmegaConf.create(dict(config)), tmp / CONFIG, resolve=True)
    info = {
        **meta,
        "tensors": len(state),
        "params": sum(t.numel() for t in state.values()),
        "bytes": (tmp / WEIGHTS).stat().st_size,
        "written": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    (tmp / META).write_text(json.dumps(info, indent=2))


def next_version(directory: Path) -> Path:
    n = 1
    while directory.with_name(f"{directory.name}.v{n}").exists():
        n += 1
    return directory.with_name(f"{directory.name}.v{n}")


# --- what a bundle must match ------------------------------------------------------------------
def token_layout(layout: TokenLayout) -> dict[str, Any]:
    """The new tokens' strings and ids per group: a bundle's rows belong to exactly these."""
    ids = range(layout.first_new_id, layout.vocab_size)
    names = dict(zip(ids, [*layout.markers, *layout.signals], strict=False))
    return {
        "first_new_id": int(layout.first_new_id),
        "markers": {names[i]: i for i in ids[: len(layout.markers)]},
        "signals": {m: {names[i]: i for i in group} for m, group in layout.signal_ids.items()},
    }


def _tokens(group: Mapping[str, int] | None) -> str:
    if not group:
        return "none"
    toks = list(group)
    shown = f"{toks[0]}..{toks[-1]}" if len(toks) > 2 else " ".join(toks)
    return f"{len(toks)} ({shown}, ids {min(group.values())}-{max(group.values())})"


def _json_hash(
    path: Path, drop: tuple[str, ...] = ("_name_or_path", "transformers_version", "_diffusers_version")
) -> str | None:
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(data, dict):
        data = {k: v for k, v in data.items() if k not in drop}
    return hashlib.sha1(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def backbone_identity(spec: ModelSpec) -> dict[str, Any]:
    """Content hashes of the frozen backbones' configs (not their paths, which move): the LLM, the
    encoder architecture and weights file, each decoder's pipeline index and text encoder."""
    arch = dict(spec.encoder.arch)
    llm = Path(spec.llm.path)
    encoder = Path(spec.encoder.checkpoint)
    out: dict[str, Any] = {
        "model.llm": {
            "config": _json_hash(llm / "config.json"),
            "tokenizer": _json_hash(llm / "tokenizer_config.json"),
        },
        "model.encoder": {
            "arch": hashlib.sha1(json.dumps(arch, sort_keys=True, default=str).encode()).hexdigest()[:16],
            "weights": file_signature(encoder) if encoder.is_file() else None,
        },
    }
    for name, dec in spec.generated.items():
        path = Path(dec.path)
        entry = {
            "index": _json_hash(path / "model_index.json"),
            "text_encoder": _json_hash(path / "text_encoder" / "config.json"),
        }
        if (
            path / "text_encoder_2"
        ).is_dir():  # SDXL's second encoder (absent elsewhere: older bundles match)
            entry["text_encoder_2"] = _json_hash(path / "text_encoder_2" / "config.json")
        out[f"model.modalities.{name}.decoder"] = entry
    return out


def bundle_identity(model: NextGPT, spec: ModelSpec) -> BundleMeta:
    return {"token_layout": token_layout(model.layout), "backbones": backbone_identity(spec)}


class BundleMeta(TypedDict, total=False):
    """A bundle's ``meta.json``: what wrote it, and the identity of its tokens and backbones."""

    stage: int
    global_step: int
    trained_steps: int
    run: str | None
    init_from: str | None
    trainable_groups: list[str]
    full_model_params: int
    imported_from: str
    legacy_import: dict[str, Any]
    token_layout: dict[str, Any]  # token_layout(): first_new_id, markers, signals
    backbones: dict[str, dict[str, Any]]  # backbone_identity()
    tensors: int
    params: int
    bytes: int
    written: str


def check_identity(directory: Path, meta: BundleMeta, model: nn.Module, spec: ModelSpec | None) -> None:
    """Refuse a bundle whose tokens or backbones are not this model's, naming what differs."""
    want = meta.get("token_layout")
    layout = getattr(model, "layout", None)
    if want is not None and layout is not None:
        have = token_layout(layout)
        faults = []
        if want["first_new_id"] != have["first_new_id"]:
            faults.append(
                f"its new tokens start at id {want['first_new_id']}, this model's at {have['first_new_id']} "
                "(another tokenizer)"
            )
        if want["markers"] != have["markers"]:
            faults.append(f"marker tokens {_tokens(want['markers'])} vs {_tokens(have['markers'])}")
        for m in sorted(set(want["signals"]) | set(have["signals"])):
            a, b = want["signals"].get(m), have["signals"].get(m)
            if a != b:
                faults.append(
                    f"{m} signal tokens {_tokens(a)} vs {_tokens(b)} in this model (model.modalities.{m}."
                    f"num_signal_tokens={len(a or {})} matches the bundle)"
                )
        if faults:
            raise BundleError(
                f"stage bundle {directory} was trained with another token layout: " + "; ".join(faults)
            )
    if spec is not None and meta.get("backbones"):
        have = backbone_identity(spec)
        diff = [
            f"{key} ({', '.join(k for k in want_v if want_v.get(k) != have.get(key, {}).get(k))})"
            for key, want_v in meta["backbones"].items()
            if key in have
            and any(
                v is not None and have[key].get(k) is not None and have[key].get(k) != v
                for k, v in want_v.items()
            )
        ]
        if diff:
            raise BundleError(
                f"stage bundle {directory} was trained on other backbones: {', '.join(diff)} differ; "
                "point those keys at the backbones it was trained with"
            )


def load_bundle_config(
    directory: str | Path, *, weights: str | Path | None = None, backbones: str | Path | None = None
):
    """The bundle's resolved training config, with backbone paths that moved found again (below)."""
    path = Path(directory) / CONFIG
    if not path.is_file():
        raise BundleError(f"stage bundle {directory} has no {CONFIG} (expected a folder written by train.py)")
    cfg = OmegaConf.load(path)
    relocate_backbones(cfg, Path(directory), weights=weights, backbones=backbones)
    return cfg


def backbone_keys(spec: ModelSpec) -> list[str]:
    return [
        "model.llm.path",
        "model.encoder.checkpoint",
        *(f"model.modalities.{m}.decoder.path" for m in spec.generated),
    ]


def relocate_backbones(
    cfg, bundle: Path, *, weights: str | Path | None = None, backbones: str | Path | None = None
) -> None:
    """A bundle's config names backbones by the absolute paths of the machine it was trained on.
    Where one is gone, look for it under the ``paths.weights`` / ``paths.backbones`` of this machine
    (given, or ``$NEXTGPT_WEIGHTS``, ``$NEXTGPT_CACHE/tiny_backbones``, ``./pretrained``,
    ``./.cache/tiny_backbones``) at the same place relative to the old root, and use it there; else
    say which key to set."""
    here = Path(__file__).resolve().parents[1]
    roots = {
        "paths.weights": [
            weights,
            os.environ.get("NEXTGPT_WEIGHTS"),
            Path.cwd() / "pretrained",
            here / "pretrained",
        ],
        "paths.backbones": [
            backbones,
            Path(os.environ["NEXTGPT_CACHE"]) / "tiny_backbones" if os.environ.get("NEXTGPT_CACHE") else None,
            Path.cwd() / ".cache" / "tiny_backbones",
            here / ".cache" / "tiny_backbones",
        ],
    }
    for key in backbone_keys(ModelSpec.from_config(cfg.model)):
        old = Path(str(OmegaConf.select(cfg, key)))
        if old.exists():
            continue
        found = None
        for root_key, candidates in roots.items():
            old_root = OmegaConf.select(cfg, root_key)
            if not old_root or not old.is_relative_to(str(old_root)):
                continue
            rel = old.relative_to(str(old_root))
            found = next((Path(c) / rel for c in candidates if c and (Path(c) / rel).exists()), None)
            if found is not None:
                break
        if found is None:
            raise BundleError(
                f"stage bundle {bundle}: {key}={str(old)!r} does not exist here (the backbones moved?). Point "
                "--weights / $NEXTGPT_WEIGHTS (real weights) or --backbones / $NEXTGPT_CACHE (tiny ones) at where they "
                f"are now, or fix {key} in {bundle / CONFIG}"
            )
        log.info("bundle %s: %s moved: using %s", bundle, key, found)
        OmegaConf.update(cfg, key, str(found))


def load_bundle_weights(directory: str | Path, model: NextGPT, spec: ModelSpec | None = None) -> list[str]:
    """Load a bundle's tensors into ``model``: its token layout and (given its ``spec``) its
    backbones must be this model's, and every bundle key must exist with the same shape."""
    path = Path(directory) / WEIGHTS
    meta_file = Path(directory) / META
    if meta_file.is_file():
        try:
            meta: BundleMeta = json.loads(meta_file.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise BundleError(f"stage bundle {meta_file} is damaged: {e}") from e
        check_identity(Path(directory), meta, model, spec)
    if not path.is_file():
        raise BundleError(f"stage bundle {directory} has no {WEIGHTS} (missing or not a stage bundle)")
    try:
        state = load_file(str(path))
    except Exception as e:  # safetensors raises several types for a damaged file
        raise BundleError(f"stage bundle weights {path} could not be read: {e}") from e
    own = model.state_dict()
    unexpected = [k for k in state if k not in own]
    mismatched = [
        f"{k}: bundle {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and own[k].shape != v.shape
    ]
    if unexpected or mismatched:
        raise BundleError(
            f"stage bundle {path} does not fit this model: "
            + (f"unknown keys {unexpected[:8]} " if unexpected else "")
            + (f"shape mismatches {mismatched[:8]}" if mismatched else "")
        )
    model.load_state_dict(state, strict=False)
    rows_file = Path(directory) / BASE_ROWS
    if rows_file.is_file():
        load_base_rows(rows_file, model)
    return list(state)


def load_base_rows(path: Path, model: NextGPT) -> None:
    """Write a bundle's own old-vocabulary rows into the frozen LLM's matrices (see BASE_ROWS)."""
    rows = load_file(str(path))
    targets = {
        "embed": model.llm.get_input_embeddings().weight,
        "head": model.llm.get_output_embeddings().weight,
    }
    for part, weight in targets.items():
        if part not in rows:
            raise BundleError(f"{path} has no {part!r} rows")
        n = model.layout.first_new_id
        if tuple(rows[part].shape) != (n, weight.shape[1]):
            raise BundleError(
                f"{path}: {part} rows {tuple(rows[part].shape)} do not fit this LLM's {(n, weight.shape[1])}"
            )
        with torch.no_grad():
            weight[:n].copy_(rows[part].to(weight.dtype))
    model.base_rows = {k: v for k, v in rows.items()}
    log.info("bundle %s: the LLM's old vocabulary rows come from %s", path.parent, path.name)
