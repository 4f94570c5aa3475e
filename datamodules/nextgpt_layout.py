"""Readers for the NExT-GPT on-disk layout (``<root>/<name>.json``, ``_comprehension``, ``_generation``).

Each reader turns JSON entries into modality-neutral ``Conversation``s for one training objective:

- ``caption``  (stage 1): X -> text, from ``<name>.json`` pairs
- ``generate`` (stage 2): text -> X, from ``<name>.json`` pairs
- ``instruct`` (stage 3): LLaVA-style conversations from ``<name>_comprehension.json`` and
  ``<name>_generation.json``

A malformed entry is skipped and counted by reason, with the file and index in the log; a
missing JSON file is an error that names the path. Media names are relative to the source's media
folder and must stay inside it (:func:`media_path`): an entry naming a file elsewhere is skipped.
"""

from __future__ import annotations

import json
import logging
import zlib
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from datamodules.entries import (  # noqa: F401  (re-exported)
    OUTSIDE_ROOT,
    Skip,
    _media,
    _text,
    as_entry,
    media_path,
    pair_turns,
)
from datamodules.original_formats import READERS as ORIGINAL_READERS
from datamodules.records import Entry
from datamodules.source_files import json_files, read_utf8
from nextgpt import modality as modality_registry
from nextgpt.data_source import DataSource
from nextgpt.modality import Modality
from nextgpt.prompts import Conversation
from nextgpt.runs import DataError

log = logging.getLogger(__name__)

OBJECTIVES = ("caption", "generate", "instruct")

CAPTION_INSTRUCTIONS = (
    "Describe this {m} briefly.",
    "What does this {m} show?",
    "Give a short caption for this {m}.",
    "Summarise the {m} in a sentence.",
)
GENERATE_REQUESTS = ("Generate {a} {m}: {c}", "Please make {a} {m} of {c}", "Show me {a} {m} of {c}")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _pick(options: tuple[str, ...], key: str) -> str:
    return options[zlib.crc32(key.encode()) % len(options)]


def _key(entry: Entry, mod: Modality, fallback: str) -> str:
    for field in ("id", f"{mod.name}_id"):
        value = entry.get(field)
        if value is not None:
            return str(value)
    return fallback


def _pairs_caption(entry: Entry, mod: Modality, root: Path | None, index: int) -> Conversation:
    file, caption = _text(entry, mod.name_field), _text(entry, "caption")
    key = _key(entry, mod, Path(file).stem)
    instruction = _pick(CAPTION_INSTRUCTIONS, key).format(m=mod.name)
    return Conversation(
        key,
        [(f"{mod.placeholder}\n{instruction}", caption)],
        media_in=[(mod.name, _media(root, mod, file))],
        kind="caption",
    )


def _pairs_generate(entry: Entry, mod: Modality, root: Path | None, index: int) -> Conversation:
    file, caption = _text(entry, mod.name_field), _text(entry, "caption")
    key = _key(entry, mod, Path(file).stem)
    request = _pick(GENERATE_REQUESTS, key).format(a=_article(mod.name), m=mod.name, c=caption)
    return Conversation(
        key,
        [(request, mod.placeholder)],
        captions_out=[(mod.name, caption)],
        media_out=[(mod.name, _media(root, mod, file))],
        kind="generate",
    )


def _turns(entry: Entry) -> list[tuple[str, str]]:
    conv = entry.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise Skip("missing or empty conversations")
    return pair_turns(conv)


def _instruct(entry: Entry, mod: Modality, root: Path, index: int) -> Conversation:
    turns = _turns(entry)
    media_in, captions_out, media_out = [], [], []
    if mod.input_field in entry:
        media_in.append((mod.name, _media(root, mod, _text(entry, mod.input_field))))
    if mod.output_field in entry:
        captions_out.append((mod.name, _text(entry, mod.captions_field)))
        media_out.append((mod.name, _media(root, mod, _text(entry, mod.output_field))))
    n_in = sum(h.count(mod.placeholder) for h, _ in turns)
    n_out = sum(a.count(mod.placeholder) for _, a in turns)
    if n_in != len(media_in) or n_out != len(captions_out):
        raise Skip(
            f"{n_in} input / {n_out} output placeholders but {len(media_in)} / {len(captions_out)} media"
        )
    file = entry.get(mod.input_field) or entry.get(mod.output_field) or f"{index}"
    direction = "out" if captions_out else "in"  # comprehension and generation share file names
    return Conversation(
        f"{Path(str(file)).stem}-{direction}",
        turns,
        media_in=media_in,
        captions_out=captions_out,
        media_out=media_out,
    )


Reader = Callable[[Entry, Modality, Path, int], Conversation]
# objective -> the reader of each of its JSON files (source_files.JSON_FILES, in the same order)
OBJECTIVE_READERS: dict[str, tuple[Reader, ...]] = {
    "caption": (_pairs_caption,),
    "generate": (_pairs_generate,),
    "instruct": (_instruct, _instruct),
}


def source_files(source: DataSource, objective: str) -> list[tuple[Path, Callable]]:
    """(JSON file, entry reader) of one ``dataset.sources`` entry for ``objective``: the NExT-GPT
    folder layout by default, or the one file of an original stage-3 format (``format``, ``file``)."""
    fmt = source.format
    if fmt == "nextgpt":
        return list(
            zip(
                json_files(source.name, source.data_root, objective),
                OBJECTIVE_READERS[objective],
                strict=True,
            )
        )
    if objective != "instruct":
        raise DataError(
            f"dataset source {source.name!r} (format {fmt}) is stage-3 instruction data; objective "
            f"{objective!r} reads text-X pairs (the NExT-GPT folder layout)"
        )
    return [(Path(str(source.file)), lambda e, mod, root, i: ORIGINAL_READERS[fmt](e, mod.name, root, i))]


def read_source(
    name: str,
    modality: str,
    root: str | Path,
    objective: str,
    warn: bool = True,
    *,
    fmt: str | None = None,
    file: str | None = None,
) -> tuple[list[Conversation], Counter]:
    """All usable conversations of one source for ``objective``, and the skip counts by reason.
    ``warn=False``: count skipped entries without a log line each (a second read of a file whose
    entries were already reported, e.g. by another rank). ``fmt`` / ``file``: a source in one of the
    original's stage-3 formats (:mod:`datamodules.original_formats`)."""
    mod = modality_registry.get(modality)
    root = Path(root)
    convs: list[Conversation] = []
    skipped: Counter = Counter()
    source = DataSource(name, modality, root=str(root), format=fmt or "nextgpt", file=file)
    for path, reader in source_files(source, objective):
        if not path.is_file():
            raise FileNotFoundError(f"dataset source {name!r} ({modality}): {path} does not exist")
        try:
            entries: Any = json.loads(read_utf8(path))
        except json.JSONDecodeError as e:
            raise DataError(f"dataset source {name!r}: {path} is not valid JSON: {e}") from e
        if not isinstance(entries, list):
            raise DataError(
                f"dataset source {name!r}: {path} holds a {type(entries).__name__}, expected a list"
            )
        for i, entry in enumerate(entries):
            try:
                convs.append(reader(as_entry(entry), mod, root, i))
            except Skip as e:
                skipped[str(e)] += 1
                if warn:
                    log.warning("skipped %s entry %d: %s", path, i, e.describe())
    return convs, skipped
