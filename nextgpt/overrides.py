"""Appended keys (``+key=value``) checked against what the config tree knows.

Hydra refuses ``key=value`` for a key the composed config lacks, but ``+key=value`` adds any key
at all: ``+stage.optim.learning_rate=0.1`` would be accepted and never read. Under ``stage``,
``model`` and ``dataset`` an appended key must be one that some file of the config tree sets
(a modality's settings count for every registered modality), a keyword the optimizer or scheduler
``_target_`` takes, or lie inside a node whose contents are free by design (a decoder's
``generate`` / ``save`` keyword arguments, the ImageBind ``arch``, the list of sources).
"""

from __future__ import annotations

import difflib
import functools
import inspect
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from hydra.utils import get_object
from omegaconf import OmegaConf

from nextgpt import modality as modality_registry

CHECKED_ROOTS = ("stage", "model", "dataset")
# nodes whose keys are free (checked where they are used, or keyword arguments of a pipeline call)
OPEN_NODES = (
    "model.modalities.*.decoder.generate",
    "model.modalities.*.decoder.save",
    "model.encoder.arch",
    "stage.loss.align_by_modality",
    "dataset.sources",
    "dataset.synthetic",
)
# nodes whose keys are the keyword arguments of their ``_target_``
TARGET_NODES = ("stage.optim.optimizer", "stage.optim.scheduler")
# the config groups and the package their files land in (``_global_``: the file names it)
GROUP_PACKAGES = {
    "stage": "stage",
    "model": "model",
    "dataset": "dataset",
    "base": "dataset",
    "optimizer": None,
    "scheduler": None,
    "experiment": "",
    "debug": "",
    "hparams_search": "",
}
_PACKAGE_LINE = re.compile(r"^#\s*@package\s+(\S+)")
_OVERRIDE = re.compile(r"^(?P<plus>\+{1,2})(?P<key>[A-Za-z_][\w.\[\]]*)=")


def _generalise(path: str) -> str:
    """``model.modalities.image.decoder`` -> ``model.modalities.*.decoder`` (any registered modality)."""
    parts = path.split(".")
    if len(parts) > 2 and parts[0] == "model" and parts[1] == "modalities":
        parts[2] = "*"
    return ".".join(parts)


def _paths(node: Any, prefix: str) -> Iterable[str]:
    if isinstance(node, dict):
        for k, v in node.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            yield key
            yield from _paths(v, key)


@functools.lru_cache(maxsize=2)
def known_keys(config_dir: Path) -> frozenset[str]:
    """Every key path under ``stage`` / ``model`` / ``dataset`` that a file of the config tree sets."""
    found: set[str] = set()
    for group, package in GROUP_PACKAGES.items():
        for f in sorted((config_dir / group).glob("*.yaml")):
            text = f.read_text(encoding="utf-8")
            declared = next((m.group(1) for m in map(_PACKAGE_LINE.match, text.splitlines()) if m), None)
            prefix = "" if declared == "_global_" else (declared or package or "")
            body = OmegaConf.to_container(OmegaConf.create(text), resolve=False) or {}
            body.pop("defaults", None) if isinstance(body, dict) else None
            for path in _paths(body, prefix):
                parts = _generalise(path).split(".")
                found.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return frozenset(p for p in found if p.split(".")[0] in CHECKED_ROOTS)


def _target_keywords(target: str | None) -> set[str] | None:
    """The keyword arguments the ``_target_`` callable accepts (``None``: any, or it can not be read)."""
    if target is None:
        return None
    try:
        params = inspect.signature(get_object(target)).parameters.values()
    except (ImportError, AttributeError, ValueError, TypeError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params}


def appended_key_errors(targets: Mapping[str, str], overrides: Iterable[str], config_dir: Path) -> list[str]:
    """``+key=value: reason`` for every appended key under ``stage`` / ``model`` / ``dataset`` that
    nothing reads (``targets``: the ``_target_`` of each of :data:`TARGET_NODES` the config sets;
    ``config_dir``: the config tree)."""
    known = known_keys(config_dir)
    errors = []
    for arg in overrides:
        m = _OVERRIDE.match(arg)
        if not m or m["key"].split(".")[0] not in CHECKED_ROOTS:
            continue
        key = re.sub(r"\[\d+\]", "", m["key"])
        general = _generalise(key)
        parts = key.split(".")
        if (
            len(parts) > 2
            and parts[:2] == ["model", "modalities"]
            and parts[2] not in modality_registry.names()
        ):
            continue  # an unknown modality is named by the model check with the registered ones
        if general in known or any(general.startswith(f"{o}.") for o in OPEN_NODES):
            continue
        parent, _, leaf = key.rpartition(".")
        if parent in TARGET_NODES:
            accepted = _target_keywords(targets.get(parent))
            if accepted is None or leaf in accepted:
                continue
            choices = sorted(accepted - {"params"})
            what = f"{targets[parent]} takes {', '.join(choices)}"
        else:
            siblings = sorted(
                {k.rpartition(".")[2] for k in known if k.rpartition(".")[0] == _generalise(parent)}
            )
            choices = siblings
            what = f"{parent} has {', '.join(siblings)}" if siblings else f"nothing reads keys under {parent}"
        close = difflib.get_close_matches(leaf, choices, n=1)
        hint = f"; did you mean {parent}.{close[0]}?" if close else ""
        errors.append(f"{m['plus']}{m['key']}: unknown key, nothing would read it ({what}){hint}")
    return errors
