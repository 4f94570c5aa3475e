"""Feature caches: frozen-model outputs computed once, stored next to the data, read memory-mapped.

Why memory-mapped ``.npy`` parts and not WebDataset shards: stages 1 and 2 look features up by
sample key in shuffled, map-style order; a memory-mapped array gives O(1) random access without
reading a shard sequentially, costs no RAM until touched, and is shared by every dataloader
worker through the page cache. Entries are fixed-size vectors, so nothing is gained by tar.

Layout of one cache (one frozen model x one preprocessing = one fingerprint)::

    <base>/<kind>-<fingerprint>/meta.json                   kind, fingerprint, shape, dtype, description
    <base>/<kind>-<fingerprint>/part-<writer>-000000.npy       (n, *shape) rows
    <base>/<kind>-<fingerprint>/part-<writer>-000000.keys.json the n keys of those rows
    <base>/<kind>-<fingerprint>/failed-<writer>.json           keys whose media could not be decoded, with the reason

``<writer>`` is the host and process that wrote the part: any number of processes (the ranks of
a multi-GPU cache pass, several machines on a shared file system) add to one store at once and
never write the same file. A part is written to a temporary name and renamed, its key list last,
so an interrupted pass leaves only whole parts; the next pass computes what is missing and adds a
part (a partial cache is completed, never silently ignored). A changed encoder or preprocessing
gives a new fingerprint, hence a new folder: stale features are never served. Nothing in a cache
names a path: the folder can be copied to another machine (or the data moved with it) and used
there, since the fingerprint hashes the weights' contents and the keys are relative to the data.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TypedDict

import numpy as np
from tqdm import tqdm

log = logging.getLogger(__name__)

CACHE_DIRNAME = ".nextgpt_cache"


def file_signature(path: str | Path, block: int = 1 << 20) -> str:
    """Size plus hashes of the first and last MiB: tells weight files apart without reading GBs."""
    p = Path(path)
    size = p.stat().st_size
    h = hashlib.sha1(str(size).encode())
    with open(p, "rb") as f:
        h.update(f.read(block))
        if size > block:
            f.seek(max(block, size - block))
            h.update(f.read(block))
    return h.hexdigest()[:16]


def fingerprint(*parts: object) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def caption_key(caption: str) -> str:
    return hashlib.sha1(caption.encode()).hexdigest()[:20]


def cache_base(data_root: str | Path, fallback: str | Path) -> Path:
    """``<data root>/.nextgpt_cache`` when writable (next to the data), else a folder under
    ``fallback`` named after the data root (read-only data, such as a shared mount)."""
    root = Path(data_root)
    beside = root / CACHE_DIRNAME
    if beside.is_dir() and os.access(beside, os.W_OK):
        return beside
    if root.is_dir() and os.access(root, os.W_OK) and not beside.exists():
        return beside
    tag = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:10]
    return Path(fallback) / f"{root.name}-{tag}"


def writer_id() -> str:
    """Names this process's parts: several processes (ranks, machines) add to one store at once
    without ever writing the same file."""
    host = "".join(c if c.isalnum() else "_" for c in socket.gethostname())[:24] or "host"
    return f"{host}-{os.getpid()}"


class _Pickled(TypedDict):
    """A :class:`FeatureStore` as it travels to a dataloader worker: its folder alone."""

    directory: Path


class FeatureStore:
    """Rows keyed by string, over any number of memory-mapped parts.

    Each writing process adds parts of its own (``part-<writer>-<n>.npy`` + its key list), and its
    own failure list, so ranks and machines fill one store at the same time without races; a part
    is visible once its key list is written (atomically, after the rows). ``refresh`` picks up what
    other processes added since; an ``add`` indexes its own part at once (no re-read of the rest).
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.writer = writer_id()
        self._index: dict[str, tuple[int, int]] = {}
        self._parts: list[np.ndarray] = []
        self._loaded: set[str] = set()
        self.failed: dict[str, str] = {}
        self.meta: dict = {}
        self.reload()

    @classmethod
    def at(cls, base: str | Path, kind: str, fp: str) -> FeatureStore:
        return cls(Path(base) / f"{kind}-{fp}")

    @property
    def exists(self) -> bool:
        return (self.directory / "meta.json").is_file()

    def reload(self) -> None:
        self._index, self._parts, self._loaded, self.failed = {}, [], set(), {}
        self.refresh()

    def refresh(self) -> None:
        """Index the parts (and failures) written since the last look, by any process."""
        if not self.exists:
            return
        self.meta = json.loads((self.directory / "meta.json").read_text())
        for part in sorted(self.directory.glob("part-*.npy")):
            if part.name not in self._loaded and not part.name.endswith(".tmp.npy"):
                self._index_part(part)
        for failed in sorted(self.directory.glob("failed*.json")):
            self.failed.update(json.loads(failed.read_text()))

    def _index_part(self, part: Path) -> None:
        keys_file = part.with_suffix(".keys.json")
        if not keys_file.is_file():
            return  # its key list is not written yet (being written, or an interrupted writer): not visible
        keys = json.loads(keys_file.read_text())
        array = np.load(part, mmap_mode="r")
        if len(keys) != array.shape[0]:
            raise ValueError(f"feature cache part {part} has {array.shape[0]} rows but {len(keys)} keys")
        n = len(self._parts)
        self._parts.append(array)
        self._loaded.add(part.name)
        for row, key in enumerate(keys):
            self._index[key] = (n, row)

    def __getstate__(self) -> _Pickled:  # dataloader workers re-open the memory maps
        return {"directory": self.directory}

    def __setstate__(self, state: _Pickled) -> None:
        type(self).__init__(self, state["directory"])

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, key: str) -> bool:
        return key in self._index

    def get(self, key: str) -> np.ndarray:
        part, row = self._index[key]
        return np.array(self._parts[part][row])  # a writable copy of one row, not a view of the map

    def missing(self, keys: Iterable[str]) -> list[str]:
        """Keys neither stored nor known to fail, in first-seen order."""
        seen, out = set(), []
        for k in keys:
            if k not in self._index and k not in self.failed and k not in seen:
                seen.add(k)
                out.append(k)
        return out

    def _write_meta(self, shape: Sequence[int], dtype: str, description: str) -> None:
        if not self.exists:
            self.directory.mkdir(parents=True, exist_ok=True)
            meta = {
                "kind": self.directory.name.rsplit("-", 1)[0],
                "fingerprint": self.directory.name.rsplit("-", 1)[-1],
                "shape": list(shape),
                "dtype": dtype,
                "description": description,
            }
            tmp = self.directory / f".meta.json.{self.writer}.tmp"
            tmp.write_text(json.dumps(meta, indent=2))
            os.replace(tmp, self.directory / "meta.json")  # two writers write the same thing
        self.meta = json.loads((self.directory / "meta.json").read_text())
        if list(self.meta["shape"]) != list(shape):
            raise ValueError(
                f"feature cache {self.directory} holds rows of shape {self.meta['shape']}, got {list(shape)}"
            )

    def add(self, keys: Sequence[str], rows: np.ndarray, description: str = "") -> None:
        """Append one part of this writer's, atomically: the rows first, then the key list."""
        if len(keys) != rows.shape[0]:
            raise ValueError(f"{len(keys)} keys for {rows.shape[0]} rows")
        if not len(keys):
            return
        self._write_meta(rows.shape[1:], str(rows.dtype), description)
        n = len(list(self.directory.glob(f"part-{self.writer}-*.npy")))
        part = self.directory / f"part-{self.writer}-{n:06d}.npy"
        tmp = part.with_name(part.stem + ".tmp.npy")
        np.save(tmp, rows)
        tmp.rename(part)
        keys_tmp = part.with_suffix(".keys.json.tmp")
        keys_tmp.write_text(json.dumps(list(keys)))
        keys_tmp.rename(part.with_suffix(".keys.json"))
        self._index_part(part)

    def add_failed(self, failures: dict[str, str]) -> None:
        if not failures:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        mine = self.directory / f"failed-{self.writer}.json"
        known = json.loads(mine.read_text()) if mine.is_file() else {}
        known.update(failures)
        tmp = mine.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(known, indent=2))
        tmp.rename(mine)
        self.failed.update(failures)

    def complete(
        self,
        keys: Sequence[str],
        compute: Callable[[list[str]], tuple[list[str], np.ndarray, dict[str, str]]],
        *,
        batch_size: int,
        part_size: int = 4096,
        dtype: str = "float16",
        description: str = "",
        desc: str = "features",
    ) -> int:
        """Compute the missing ``keys`` in batches (``compute`` returns the keys it produced, their
        rows and the failures), writing a part every ``part_size`` rows. Returns rows added."""
        todo = self.missing(keys)
        added = 0
        buf_keys: list[str] = []
        buf_rows: list[np.ndarray] = []
        failures: dict[str, str] = {}
        with tqdm(total=len(todo), desc=desc, unit="item", disable=not todo) as bar:
            for i in range(0, len(todo), batch_size):
                done, rows, failed = compute(todo[i : i + batch_size])
                if done:
                    buf_keys += done
                    buf_rows.append(np.asarray(rows, dtype=dtype))
                failures.update(failed)
                bar.update(len(todo[i : i + batch_size]))
                if len(buf_keys) >= part_size:
                    self.add(buf_keys, np.concatenate(buf_rows), description)
                    added += len(buf_keys)
                    buf_keys, buf_rows = [], []
        if buf_keys:
            self.add(buf_keys, np.concatenate(buf_rows), description)
            added += len(buf_keys)
        self.add_failed(failures)
        return added
