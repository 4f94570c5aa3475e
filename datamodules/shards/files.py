"""Shard files: counting their samples, and random access to one shard's samples (which files a source
reads: ``datamodules.source_files``)."""

from __future__ import annotations

import json
import logging
import tarfile
from collections.abc import Sequence
from pathlib import Path

from webdataset.tariterators import base_plus_ext

from datamodules.shards.sample import SkipSample
from datamodules.source_files import INDEX_SUFFIX

log = logging.getLogger(__name__)

Members = dict[str, tarfile.TarInfo]  # one sample's members by (lower-case) extension


def _scan(tar: tarfile.TarFile) -> list[tuple[str, Members]]:
    """Samples as runs of consecutive members sharing a key (as WebDataset groups them: the key is
    everything before the first dot of the base name)."""
    samples: list[tuple[str, Members]] = []
    for info in tar:
        if not info.isreg():
            continue
        key, ext = base_plus_ext(info.name)
        if key is None or ext is None:
            continue
        if not samples or samples[-1][0] != key:
            samples.append((key, {}))
        samples[-1][1].setdefault(ext.lower(), info)
    return samples


def shard_counts(paths: Sequence[Path]) -> list[int]:
    """Samples per shard: from ``*.shards.json`` indexes, img2dataset ``_stats.json``, else a header scan."""
    known: dict[tuple[Path, str], int] = {}
    for folder in {p.parent for p in paths}:
        for index in folder.glob(f"*{INDEX_SUFFIX}"):
            try:
                for s in json.loads(index.read_text())["shards"]:
                    known[(folder, s["file"])] = int(s["samples"])
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"shard index {index} is malformed: {e}") from e
    counts = []
    for p in paths:
        n = known.get((p.parent, p.name))
        stats = p.with_name(p.name[: -len(".tar")] + "_stats.json") if p.name.endswith(".tar") else None
        if n is None and stats is not None and stats.is_file():
            try:
                n = int(json.loads(stats.read_text())["successes"])
            except (ValueError, KeyError, TypeError):
                n = None
        if n is None:
            try:
                with tarfile.open(p, "r:*") as tar:
                    n = len(_scan(tar))
            except (tarfile.TarError, OSError) as e:
                raise ValueError(f"shard {p} is not a readable tar: {e}") from e
        counts.append(n)
    return counts


class TarSamples:
    """Random access to one shard's samples: headers scanned on open, member data read on demand."""

    def __init__(self, path: Path, expected: int):
        self.path = path
        try:
            self._tar = tarfile.open(path, "r:*")
            self.samples = _scan(self._tar)
        except (tarfile.TarError, OSError) as e:
            raise ValueError(f"shard {path} is not a readable tar: {e}") from e
        if len(self.samples) != expected:
            log.warning(
                "shard %s holds %d samples, its index says %d: the %s are skipped",
                path,
                len(self.samples),
                expected,
                "missing ones" if len(self.samples) < expected else "extra ones",
            )

    def sample(self, i: int) -> tuple[str, Members]:
        if i >= len(self.samples):
            raise SkipSample("missing from shard", f"sample {i} of {self.path.name}")
        return self.samples[i]

    def read(self, info: tarfile.TarInfo) -> bytes:
        try:
            f = self._tar.extractfile(info)
            return f.read() if f is not None else b""
        except (tarfile.TarError, OSError) as e:
            raise SkipSample("unreadable member", f"{info.name}: {e}") from e

    def close(self) -> None:
        self._tar.close()


class OpenShards:
    """The shards one consumer has open: all closed when a new group of the order starts, or, with
    ``keep``, only once more than ``keep`` are open (the balanced mix returns to a source's shards)."""

    def __init__(self, paths: Sequence[Path], counts: Sequence[int], keep: int | None = None):
        self.paths, self.counts, self.keep = paths, counts, keep
        self._open: dict[int, TarSamples] = {}

    def new_group(self) -> None:
        if self.keep is None or len(self._open) > self.keep:
            self.close()

    def get(self, shard: int) -> TarSamples:
        if shard not in self._open:
            self._open[shard] = TarSamples(self.paths[shard], self.counts[shard])
        return self._open[shard]

    def close(self) -> None:
        for reader in self._open.values():
            reader.close()
        self._open = {}
