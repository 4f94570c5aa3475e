"""Shard writer: NExT-GPT-layout pairs and instruction JSON -> WebDataset tar shards.

Why shards: users have tens of millions of pairs; one JSON list plus a folder of small files does
not stream, shuffle or split over GPUs. A shard is a plain tar that WebDataset, img2dataset and
video2dataset all understand. :mod:`datamodules.shards` reads them.

This module reads the source formats into records (the NExT-GPT layout's pairs and instruction
conversations; LLaVA, VideoChat, MosIT, T2X and Alpaca instruction files) and runs the conversion;
:mod:`datamodules.shard_writer` writes the records as shards (its docstring has the sample layout
and the two record kinds, ``pair`` and ``conversation``, that one copy of the pairs serves stage 1
*and* stage 2 with).

CLI::

    python -m datamodules.prepare --format nextgpt --root DIR --name cc3m --modality image --out SHARDS
    python -m datamodules.prepare --format llava|alpaca|mosit --json FILE --media-root DIR --out SHARDS
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from datamodules.entries import Skip, _text, as_entry, media_path
from datamodules.nextgpt_layout import _turns, read_source
from datamodules.records import Entry
from datamodules.shard_writer import Record, conversation_record, pair_record, write_shards
from datamodules.source_files import read_utf8, source_identity
from nextgpt import modality as modality_registry
from nextgpt.data_source import SourceIdentity
from nextgpt.prompts import Conversation

log = logging.getLogger(__name__)

FORMATS = ("nextgpt", "llava", "alpaca", "mosit")
NEXTGPT_SETS = ("pairs", "instruct")


# ------------------------------------------------------------------------------------------------
# readers
# ------------------------------------------------------------------------------------------------
def read_nextgpt_pairs(root: str | Path, name: str, modality: str) -> tuple[list[Record], Counter]:
    """``<root>/<name>.json`` as pair records (via the stage-1 reader, so keys and skips match it)."""
    convs, skipped = read_source(name, modality, root, "caption")
    return [pair_record(c.key, c.media_in[0][0], c.turns[0][1], c.media_in[0][1]) for c in convs], skipped


def read_nextgpt_instruct(root: str | Path, name: str, modality: str) -> tuple[list[Record], Counter]:
    """``_comprehension`` and ``_generation`` conversations, with the generated media attached
    (the conversations of :func:`read_source` keep their ``output_<modality>`` files, checked to lie
    inside the media folder like every media name)."""
    convs, skipped = read_source(name, modality, root, "instruct")
    return [conversation_record(c) for c in convs], skipped


def _load_entries(path: Path) -> list[Any]:
    """A JSON list, or JSON Lines (``.jsonl``); errors name the file."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    text = read_utf8(path)
    try:
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        entries = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(entries, list):
        raise ValueError(f"{path} holds a {type(entries).__name__}, expected a list of entries")
    return entries


def _as_list(value: Any, field_name: str) -> list[str]:
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, str) and v.strip() for v in values):
        raise Skip(f"{field_name} is not a non-empty string or a list of them")
    return [v.strip() for v in values]


def _placeholder_order(texts: Iterable[str]) -> list[str]:
    names = "|".join(re.escape(n) for n in modality_registry.names())
    pattern = re.compile(rf"<({names})>")
    return [m.group(1) for t in texts for m in pattern.finditer(t)]


def _qa_turns(entry: Entry) -> list[tuple[str, str]]:
    """VideoChat's ``{"QA": [{"i": instruction, "q": question, "a": answer}]}``."""
    qa = entry.get("QA")
    if not isinstance(qa, list) or not qa:
        raise Skip("missing or empty conversations")
    turns = []
    for item in qa:
        if not isinstance(item, dict) or not isinstance(item.get("a"), str):
            raise Skip("QA item is not {i, q, a: str}")
        human = "\n".join(s for s in (item.get("i"), item.get("q")) if isinstance(s, str) and s.strip())
        turns.append((human, item["a"]))
    return turns


def _conversation_entry(
    entry: Entry, index: int, media_root: Path
) -> tuple[Conversation, list[tuple[str, Path]]]:
    """One LLaVA-style entry: ``conversations`` (or VideoChat ``QA``) plus media fields.

    Inputs: ``<m>`` (LLaVA's ``image``, VideoChat's ``video``) or ``input_<m>``, a file or a list.
    Outputs: ``output_<m>`` files and ``<m>_captions``. Media are matched to the placeholders in the
    order these appear in the turns; an entry with media but no placeholder at all gets them
    prepended to its first human turn (some LLaVA entries omit ``<image>``). Media names are relative
    to ``media_root`` and must stay inside it (:func:`~datamodules.nextgpt_layout.media_path`).
    """
    turns = _turns(entry) if "conversations" in entry else _qa_turns(entry)
    ins: dict[str, list[Path]] = {}
    outs: dict[str, list[Path]] = {}
    caps: dict[str, list[str]] = {}
    for mod in (modality_registry.get(n) for n in modality_registry.names()):
        files = _as_list(entry.get(mod.name), mod.name) + _as_list(
            entry.get(mod.input_field), mod.input_field
        )
        ins[mod.name] = [media_path(media_root, f) for f in files]
        outs[mod.name] = [
            media_path(media_root, f) for f in _as_list(entry.get(mod.output_field), mod.output_field)
        ]
        caps[mod.name] = _as_list(entry.get(mod.captions_field), mod.captions_field)
        if outs[mod.name] and not caps[mod.name]:
            raise Skip(f"{mod.output_field} without {mod.captions_field}")
    want_in = _placeholder_order(h for h, _ in turns)
    if not want_in and any(ins.values()):
        prefix = "".join(f"{modality_registry.get(m).placeholder}\n" for m, fs in ins.items() for _ in fs)
        turns[0] = (prefix + turns[0][0], turns[0][1])
        want_in = _placeholder_order(h for h, _ in turns)
    want_out = _placeholder_order(a for _, a in turns)
    for want, have, what in ((want_in, ins, "input media"), (want_out, caps, "output captions")):
        counts = Counter(want)
        if any(counts[m] != len(have[m]) for m in have):
            got = {m: len(v) for m, v in have.items() if v}
            raise Skip(f"placeholders {dict(counts)} do not match the {what} {got}")
    media_in = [(m, str(ins[m][want_in[:i].count(m)])) for i, m in enumerate(want_in)]
    captions_out = [(m, caps[m][want_out[:i].count(m)]) for i, m in enumerate(want_out)]
    media_out = [(m, outs[m][want_out[:i].count(m)]) for i, m in enumerate(want_out) if outs[m]]
    key = str(entry["id"]) if entry.get("id") is not None else f"{index:08d}"
    return Conversation(key, turns, media_in=media_in, captions_out=captions_out), media_out


def read_conversations(json_file: str | Path, media_root: str | Path) -> tuple[list[Record], Counter]:
    """LLaVA-150k, VideoChat, MosIT and T2X instruction files (``--format llava`` / ``mosit``)."""
    path, media_root = Path(json_file), Path(media_root)
    records: list[Record] = []
    skipped: Counter[str] = Counter()
    for i, value in enumerate(_load_entries(path)):
        try:
            entry = as_entry(value)
            conv, media_out = _conversation_entry(entry, i, media_root)
            records.append(conversation_record(conv, media_out))
        except Skip as e:
            skipped[str(e)] += 1
            log.warning("skipped %s entry %d: %s", path, i, e.describe())
    return records, skipped


def read_alpaca(json_file: str | Path) -> tuple[list[Record], Counter]:
    """Alpaca ``{"instruction", "input", "output"}``: text-only conversations."""
    path = Path(json_file)
    records: list[Record] = []
    skipped: Counter[str] = Counter()
    for i, value in enumerate(_load_entries(path)):
        try:
            entry = as_entry(value)
            human = _text(entry, "instruction")
            extra = entry.get("input")
            if isinstance(extra, str) and extra.strip():
                human = f"{human}\n{extra.strip()}"
            conv = Conversation(str(entry.get("id", f"{i:08d}")), [(human, _text(entry, "output"))])
            records.append(conversation_record(conv))
        except Skip as e:
            skipped[str(e)] += 1
            log.warning("skipped %s entry %d: %s", path, i, e.describe())
    return records, skipped


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------
def prepare_nextgpt(
    root: str | Path,
    name: str,
    modality: str,
    out: str | Path,
    *,
    sets: Sequence[str] = NEXTGPT_SETS,
    shard_size: int = 1000,
    overwrite: bool = False,
    strict: bool = False,
    identity: SourceIdentity | None = None,
    media: str = "listing",
) -> dict[str, list[Path]]:
    """Shard sets ``{name}-pairs`` (stages 1 and 2) and ``{name}-instruct`` (stage 3) of one source.
    Each index records the source's identity (``datamodules.source_files``: its resolved root, JSON files
    and media), taken before reading (``identity``: already taken, for a one-set call)."""
    readers = {"pairs": read_nextgpt_pairs, "instruct": read_nextgpt_instruct}
    written = {}
    for s in sets:
        if s not in readers:
            raise ValueError(f"unknown shard set {s!r}; known: {list(readers)}")
        signature: SourceIdentity = (
            SourceIdentity(**identity)
            if identity is not None and len(sets) == 1
            else source_identity(root, name, modality, s, media)
        )
        records, skipped = readers[s](root, name, modality)
        written[s] = write_shards(
            records,
            out,
            name=f"{name}-{s}",
            shard_size=shard_size,
            overwrite=overwrite,
            strict=strict,
            total=len(records),
            skipped=skipped,
            source=signature,
        )
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m datamodules.prepare", description=__doc__.split("\n\n")[0])
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--out", required=True, type=Path, help="folder for the shards and their index")
    p.add_argument("--name", help="shard set name (default: --name of the source, or the JSON file's stem)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--overwrite", action="store_true", help="replace existing shards of the same name")
    p.add_argument("--strict", action="store_true", help="a missing media file is an error, not a skip")
    g = p.add_argument_group("--format nextgpt")
    g.add_argument("--root", type=Path, help="dataset folder holding <name>.json and its media folder")
    g.add_argument("--modality", help=f"one of {modality_registry.names()}")
    g.add_argument(
        "--sets", default=",".join(NEXTGPT_SETS), help="comma list of: pairs (stages 1-2), instruct (stage 3)"
    )
    g = p.add_argument_group("--format llava | alpaca | mosit")
    g.add_argument("--json", type=Path, help="instruction JSON (or .jsonl) file")
    g.add_argument(
        "--media-root", type=Path, default=None, help="folder the media paths in the JSON are relative to"
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.format == "nextgpt":
            if not (args.root and args.name and args.modality):
                p.error("--format nextgpt needs --root, --name and --modality")
            modality_registry.get(args.modality)
            sets = [s.strip() for s in args.sets.split(",") if s.strip()]
            written = prepare_nextgpt(
                args.root,
                args.name,
                args.modality,
                args.out,
                sets=sets,
                shard_size=args.shard_size,
                overwrite=args.overwrite,
                strict=args.strict,
            )
            shards = [s for paths in written.values() for s in paths]
        else:
            if not args.json:
                p.error(f"--format {args.format} needs --json")
            if args.format == "alpaca":
                records, skipped = read_alpaca(args.json)
            else:
                records, skipped = read_conversations(args.json, args.media_root or args.json.parent)
            shards = write_shards(
                records,
                args.out,
                name=args.name or args.json.stem,
                shard_size=args.shard_size,
                overwrite=args.overwrite,
                strict=args.strict,
                total=len(records),
                skipped=skipped,
            )
    except (FileNotFoundError, FileExistsError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(shards)} shards to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
