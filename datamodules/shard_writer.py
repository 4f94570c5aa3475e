"""Writing WebDataset tar shards: the records a converter produces, their tar samples, the index.

Sample layout (every member of one sample shares the key; keys hold no dot, WebDataset splits the
member name at the first dot)::

    {key}.json        the record, see below
    {key}.jpg         pair media (original extension kept: jpg/png/wav/flac/mp4 ...)
    {key}.in0.jpg     conversation input media, in placeholder order
    {key}.out0.png    conversation output media (kept for completeness; training uses the captions)

Two record kinds, so one copy of the pairs serves stage 1 *and* stage 2:

- ``{"kind": "pair", "key", "caption", "media": [modality, member_ext], "source"}``: a plain
  text-X pair. The reader turns it into an X->text *caption* conversation or a text->X *generate*
  conversation depending on the stream's objective, with the same instruction the JSON readers of
  :mod:`datamodules.nextgpt_layout` pick for that key.
- ``{"kind": "conversation", "key", "turns": [[human, assistant], ...], "media_in": [[modality,
  member_ext], ...], "captions_out": [[modality, caption], ...], "media_out": [[modality,
  member_ext], ...], "source"}``: an explicit instruction conversation (LLaVA, Alpaca, VideoChat,
  MosIT, T2X, NExT-GPT ``_comprehension`` / ``_generation``), read as it is for every objective.

Shards made by img2dataset / video2dataset (``{key}.jpg`` + ``{key}.txt`` + metadata ``{key}.json``)
need no conversion: the reader (:mod:`datamodules.shards`) takes them as pairs.

Each shard is written under a temporary name and renamed when complete; ``{name}.shards.json`` (shard
files, sample counts, total, skipped entries) is written last, so a folder with an index is complete.
The readers of source formats and the CLI that feeds them here are :mod:`datamodules.prepare`.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import webdataset as wds
from tqdm import tqdm

from datamodules.entries import Skip
from datamodules.source_files import INDEX_SUFFIX
from nextgpt.data_source import SourceIdentity
from nextgpt.prompts import Conversation

log = logging.getLogger(__name__)

INDEX_FORMAT = "nextgpt-shards/1"
_UNSAFE_KEY = re.compile(r"[^A-Za-z0-9_-]+")


@dataclass
class Record:
    """One sample to write: its JSON body (without ``key`` / ``source``) and its media files."""

    key: str  # the source's own id; the tar key is derived from it (made tar-safe and unique)
    data: dict[str, Any]
    files: dict[str, Path] = field(default_factory=dict)  # member extension ("jpg", "in0.wav") -> file


def _member_ext(path: str | Path, prefix: str = "") -> str:
    suffix = Path(path).suffix.lower().lstrip(".")
    if not suffix:
        raise Skip(f"media file {path} has no extension")
    return f"{prefix}{suffix}"


def pair_record(key: str, modality: str, caption: str, path: str | Path) -> Record:
    """A text-X pair, stored once and read as a caption or a generate conversation."""
    ext = _member_ext(path)
    return Record(key, {"kind": "pair", "caption": caption, "media": [modality, ext]}, {ext: Path(path)})


def conversation_record(conv: Conversation, media_out: Sequence[tuple[str, str | Path]] = ()) -> Record:
    """An explicit conversation; ``conv.media_in`` holds file paths, stored as ``in{i}.{ext}`` members.

    Output media: ``media_out``, else the conversation's own ``media_out`` where it has one.
    """
    media_out = list(media_out) or list(getattr(conv, "media_out", None) or [])
    files: dict[str, Path] = {}
    media_in, out = [], []
    for i, (mod, path) in enumerate(conv.media_in):
        ext = _member_ext(path, f"in{i}.")
        files[ext] = Path(path)
        media_in.append([mod, ext])
    for i, (mod, out_path) in enumerate(media_out):
        ext = _member_ext(out_path, f"out{i}.")
        files[ext] = Path(out_path)
        out.append([mod, ext])
    data = {
        "kind": "conversation",
        "turns": [[h, a] for h, a in conv.turns],
        "media_in": media_in,
        "captions_out": [[m, c] for m, c in conv.captions_out],
        "media_out": out,
    }
    return Record(conv.key, data, files)


def tar_key(key: str, taken: set[str]) -> str:
    """A key WebDataset can split off (no dot, no slash) and unique among ``taken`` (which it joins)."""
    base = _UNSAFE_KEY.sub("_", key).strip("_") or "sample"
    out, n = base, 0
    while out in taken:
        n += 1
        out = f"{base}_{n}"
    taken.add(out)
    return out


def shard_name(name: str, index: int) -> str:
    return f"{name}-{index:06d}.tar"


def _existing_shards(out_dir: Path, name: str) -> list[Path]:
    pattern = re.compile(rf"^{re.escape(name)}-\d{{6}}\.tar$")
    return sorted(p for p in out_dir.iterdir() if pattern.match(p.name))


class _ShardSink:
    """Rolls over to a new tar every ``shard_size`` samples; a shard only appears when complete."""

    def __init__(self, out_dir: Path, name: str, shard_size: int):
        self.out_dir, self.name, self.shard_size = out_dir, name, shard_size
        self.written: list[tuple[Path, int]] = []
        self._open: tuple[IO[bytes], wds.TarWriter] | None = None  # the current shard's .tmp file, its writer
        self._count = 0

    def write(self, sample: dict[str, str | bytes]) -> None:
        if self._open is None:
            final = self.out_dir / shard_name(self.name, len(self.written))
            file = open(final.with_name(final.name + ".tmp"), "wb")
            self._open = (file, wds.TarWriter(file, encoder=False, mtime=0.0))
            self._count = 0
        self._open[1].write(sample)
        self._count += 1
        if self._count >= self.shard_size:
            self.finish()

    def finish(self) -> None:
        if self._open is None:
            return
        file, writer = self._open
        writer.close()
        file.close()
        final = self.out_dir / shard_name(self.name, len(self.written))
        os.replace(final.with_name(final.name + ".tmp"), final)
        self.written.append((final, self._count))
        self._open = None

    def abort(self) -> None:
        if self._open is not None:
            file, writer = self._open
            writer.close()
            file.close()
            Path(file.name).unlink(missing_ok=True)
            self._open = None


def write_shards(
    records: Iterable[Record],
    out_dir: str | Path,
    *,
    name: str,
    shard_size: int = 1000,
    overwrite: bool = False,
    strict: bool = False,
    total: int | None = None,
    skipped: Counter | None = None,
    source: SourceIdentity | None = None,
) -> list[Path]:
    """Write ``records`` as ``out_dir/{name}-000000.tar`` ... and the index ``{name}.shards.json``.

    A record whose media file is missing or empty is skipped with a warning naming key and file
    (``strict=True`` raises instead): one lost file should not stop a conversion of millions.
    ``skipped`` (entries the readers already dropped) is added to the index's skip counts.
    ``source``: signatures of the files the records came from (``source_files.source_identity``), kept in the
    index so a reader can tell when the source has changed since.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if not name or _UNSAFE_KEY.search(name.replace(".", "_")) or "/" in name:
        raise ValueError(f"shard set name {name!r} must be a plain file-name stem (letters, digits, _ -)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    old = _existing_shards(out, name)
    if old and not overwrite:
        raise FileExistsError(
            f"{out} already holds {len(old)} shards of {name!r} ({old[0].name} ...); "
            "pass overwrite=True (--overwrite) to replace them"
        )
    for partial in out.glob(f"{glob.escape(name)}-*.tar.tmp"):  # a killed writer's (one writer a folder)
        partial.unlink()
    counts: Counter = Counter(skipped or {})
    taken: set[str] = set()
    sink = _ShardSink(out, name, shard_size)
    try:
        for rec in tqdm(records, total=total, desc=f"shards {name}", unit="sample"):
            sample: dict[str, str | bytes] = {}  # member extension (and "__key__") -> its bytes (key)
            try:
                for ext, path in rec.files.items():
                    path = Path(path)
                    if not path.is_file() or path.stat().st_size == 0:
                        raise Skip(f"media file {path} is missing or empty")
                    sample[ext] = path.read_bytes()
            except Skip as e:
                if strict:
                    raise FileNotFoundError(f"{name}: sample {rec.key!r}: {e}") from None
                counts["missing media file"] += 1
                log.warning("skipped %s sample %r: %s", name, rec.key, e)
                continue
            key = tar_key(rec.key, taken)
            sample["__key__"] = key
            sample["json"] = json.dumps(
                {"key": rec.key, **rec.data, "source": name}, ensure_ascii=False
            ).encode()
            sink.write(sample)
        sink.finish()
    except BaseException:
        sink.abort()
        raise
    paths = [p for p, _ in sink.written]
    for stale in set(old) - set(paths):
        stale.unlink()
    index = {
        "format": INDEX_FORMAT,
        "name": name,
        "shards": [{"file": p.name, "samples": n} for p, n in sink.written],
        "total": sum(n for _, n in sink.written),
        "skipped": dict(counts),
        "source": dict(source or {}),
    }
    tmp = out / f".{name}{INDEX_SUFFIX}.tmp"
    tmp.write_text(json.dumps(index, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, out / f"{name}{INDEX_SUFFIX}")
    log.info(
        "wrote %d samples in %d shards to %s (skipped: %s)",
        index["total"],
        len(paths),
        out,
        dict(counts) or "none",
    )
    return paths
