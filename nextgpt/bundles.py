"""Which parameters a stage trains, and stage bundles: trainable weights + the resolved config.

A bundle is ``<dir>/trainable.safetensors`` + ``<dir>/config.yaml`` + ``<dir>/meta.json``. It holds
trainable-group weights only (projectors, new-token rows, LoRA): what this stage trained and what
it carried over from earlier stages; the frozen backbones are rebuilt from the config. Stage N starts
from stage N-1's bundle, so a bundle must load into the next stage's model with every key used.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import nn

# group name -> predicate on a parameter name
TRAINABLE_GROUPS = {
    "input_projector": lambda n: n.startswith("input_projector."),
    "output_projectors": lambda n: n.startswith("output_projectors."),
    "new_tokens.markers": lambda n: n.startswith("new_tokens.markers."),
    "new_tokens.signals": lambda n: n.startswith("new_tokens.signals."),
    "lora": lambda n: n.startswith("llm.") and ".lora_" in n,
}

WEIGHTS, CONFIG, META = "trainable.safetensors", "config.yaml", "meta.json"


class BundleError(RuntimeError):
    pass


def set_trainable(model: nn.Module, groups: Iterable[str]) -> list[str]:
    """Make exactly ``groups`` trainable; everything else frozen. Returns the trainable names.

    A group that matches no parameter is an error: a stage that silently trains nothing is the
    bug this function exists to prevent.
    """
    groups = list(groups)
    unknown = [g for g in groups if g not in TRAINABLE_GROUPS]
    if unknown:
        raise ValueError(f"unknown trainable group(s) {unknown}; known: {sorted(TRAINABLE_GROUPS)}")
    matched = {g: 0 for g in groups}
    names = []
    for name, p in model.named_parameters():
        hit = [g for g in groups if TRAINABLE_GROUPS[g](name)]
        p.requires_grad_(bool(hit))
        for g in hit:
            matched[g] += 1
        if hit:
            names.append(name)
    empty = [g for g, n in matched.items() if n == 0]
    if empty:
        raise ValueError(f"trainable group(s) {empty} match no parameter of the model (is LoRA applied?)")
    model.train(model.training)  # re-apply the frozen-children-in-eval rule
    return names


def bundle_state_dict(model: nn.Module, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """The named parameters (default: every trainable-group parameter); never a backbone weight.

    Sharded parameters (FSDP2, ZeRO-3) are gathered one at a time, only these: every rank must
    call this, and no rank ever holds more than one whole tensor beyond its shards."""
    from nextgpt.strategies import full_tensor

    wanted = set(names) if names is not None else None
    out = {}
    for n, p in model.named_parameters():
        if not any(match(n) for match in TRAINABLE_GROUPS.values()):
            continue
        if wanted is None or n in wanted:
            out[n] = full_tensor(p).contiguous()
    if wanted is not None and wanted - set(out):
        raise BundleError(f"not trainable-group parameters of the model: {sorted(wanted - set(out))[:8]}")
    return out


def save_bundle(directory: str | Path, model: nn.Module | None, config: Mapping[str, Any], meta: Mapping[str, Any],
                names: Iterable[str] | None = None, state: Mapping[str, torch.Tensor] | None = None) -> Path:
    """Write the bundle atomically (temp dir + rename), so a crash never leaves half a bundle.

    ``names``: the parameters to keep, normally what this stage trained plus what it loaded from
    the previous bundle (a stage-1 bundle then holds no untrained output projector). ``state``:
    those tensors already gathered (``bundle_state_dict``), in place of ``model``.
    """
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    directory = Path(directory)
    tmp = directory.with_name(directory.name + f".tmp-{int(time.time() * 1e6)}")
    tmp.mkdir(parents=True)
    state = dict(state) if state is not None else bundle_state_dict(model, names)
    save_file(state, str(tmp / WEIGHTS))
    OmegaConf.save(OmegaConf.create(dict(config)), tmp / CONFIG, resolve=True)
    info = {
        **meta,
        "tensors": len(state),
        "params": sum(t.numel() for t in state.values()),
        "bytes": (tmp / WEIGHTS).stat().st_size,
        "written": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    (tmp / META).write_text(json.dumps(info, indent=2))
    if directory.exists():
        old = directory.with_name(directory.name + f".old-{int(time.time() * 1e6)}")
        directory.rename(old)
        tmp.rename(directory)
        import shutil

        shutil.rmtree(old)
    else:
        tmp.rename(directory)
    return directory


def load_bundle_config(directory: str | Path):
    from omegaconf import OmegaConf

    path = Path(directory) / CONFIG
    if not path.is_file():
        raise BundleError(f"stage bundle {directory} has no {CONFIG} (expected a folder written by train.py)")
    return OmegaConf.load(path)


def load_bundle_weights(directory: str | Path, model: nn.Module) -> list[str]:
    """Load a bundle's tensors into ``model``; every bundle key must exist with the same shape."""
    from safetensors.torch import load_file

    path = Path(directory) / WEIGHTS
    if not path.is_file():
        raise BundleError(f"stage bundle {directory} has no {WEIGHTS} (missing or not a stage bundle)")
    try:
        state = load_file(str(path))
    except Exception as e:  # safetensors raises several types for a damaged file
        raise BundleError(f"stage bundle weights {path} could not be read: {e}") from e
    own = model.state_dict()
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k}: bundle {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in state.items() if k in own and own[k].shape != v.shape]
    if unexpected or mismatched:
        raise BundleError(
            f"stage bundle {path} does not fit this model: "
            + (f"unknown keys {unexpected[:8]} " if unexpected else "")
            + (f"shape mismatches {mismatched[:8]}" if mismatched else "")
        )
    model.load_state_dict(state, strict=False)
    return list(state)
