"""What a data source is: its resolved root, its JSON files and its media, as one identity.

Shards written from a source are kept under a folder named by that identity,
``${paths.shards}/<name>/<root key>/<set>-<identity key>/``, so:

- a second data root with the same dataset name and file names but other media never reads the
  first root's shards (another root key);
- a source whose JSON or media changed gets shards of its own (another identity key) while runs
  still reading the old version keep them (a shared lock; versions nobody holds are removed);
- a run's key includes the identity, so a changed data set is another run.

The identity of a source (``source_identity``) is:

- ``root``: the data root with every symlink resolved;
- ``json``: each JSON file's size, modification time and the hashes of its first and last MiB
  (``source_signature``);
- ``media`` (``dataset.media_identity=listing``, the default): the count, total size and a hash
  of the name, size and modification time of every file under the modality's media folder. It
  costs one ``stat`` per file (about 10 us on a local disk: 100 s for 10 M files) and is taken once
  per source per run. ``dataset.media_identity=none`` leaves media out, for stores whose media never
  change in place (a changed file then goes unnoticed until its JSON changes too).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

from datamodules.nextgpt_layout import json_files
from datamodules.records import MediaListing, SourceIdentity
from nextgpt import modality as modality_registry
from nextgpt.cache.store import file_signature

MEDIA_IDENTITIES = ("listing", "none")
_MEMO: dict[tuple[str, str], MediaListing] = {}


def forget() -> None:
    """Take media listings afresh (a new run in the same process)."""
    _MEMO.clear()


def media_listing(folder: Path) -> MediaListing:
    """``{"files", "bytes", "digest"}`` of every file under ``folder`` (names relative to it)."""
    digest, files, size = hashlib.sha1(), 0, 0
    stack = [folder] if folder.is_dir() else []
    while stack:
        current = stack.pop()
        with os.scandir(current) as it:
            entries = sorted(it, key=lambda e: e.name)
        for entry in entries:
            if entry.is_dir():
                stack.append(Path(entry.path))
                continue
            st = entry.stat()
            files, size = files + 1, size + st.st_size
            digest.update(f"{os.path.relpath(entry.path, folder)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return {"files": files, "bytes": size, "digest": digest.hexdigest()[:16]}


SET_OBJECTIVE = {
    "pairs": "caption",
    "instruct": "instruct",
}  # the objective whose JSON files a set is written from


def source_signature(root: str | Path, name: str, shard_set: str) -> dict[str, str]:
    """Signatures (size, modification time, first and last MiB) of the NExT-GPT JSON files a shard
    set is written from: cheap to take at every start, different after any edit of the file."""
    return {
        path.name: signed(path) for path in json_files(name, root, SET_OBJECTIVE[shard_set]) if path.is_file()
    }


def signed(path: Path) -> str:
    """One data file's signature: size, first and last MiB, and its modification time."""
    return f"{file_signature(path)}-{path.stat().st_mtime_ns}"


def source_identity(
    root: str | Path,
    name: str,
    modality: str,
    shard_set: str,
    media: str = "listing",
    file: str | Path | None = None,
) -> SourceIdentity:
    """The identity of one source's shard set (see the module docstring); ``file``: the JSON file of
    a source in one of the original's stage-3 formats, signed the same way."""
    if media not in MEDIA_IDENTITIES:
        raise ValueError(f"dataset.media_identity={media!r}: must be one of {list(MEDIA_IDENTITIES)}")
    resolved = Path(root).resolve()
    json_sig = (
        {Path(file).name: signed(Path(file))}
        if file is not None and Path(file).is_file()
        else source_signature(resolved, name, shard_set)
    )
    ident: SourceIdentity = {"root": str(resolved), "json": json_sig}
    if media == "listing":
        folder = resolved / modality_registry.get(modality).media_folder
        key = (str(folder), modality)
        if key not in _MEMO:
            _MEMO[key] = media_listing(folder)
        ident["media"] = _MEMO[key]
    return ident


def key_of(obj: Any, n: int = 12) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def root_folder(shards_root: str | Path, name: str, root: str | Path) -> Path:
    """``${paths.shards}/<name>/<root folder name>-<hash of the resolved root>``: one root's versions."""
    resolved = Path(root).resolve()
    return Path(shards_root) / name / f"{resolved.name or 'root'}-{key_of(str(resolved), 10)}"


def version_folder(shards_root: str | Path, name: str, shard_set: str, ident: SourceIdentity) -> Path:
    return root_folder(shards_root, name, ident["root"]) / f"{shard_set}-{key_of(dict(ident))}"


def differences(recorded: SourceIdentity | None, now: SourceIdentity) -> list[str]:
    """What differs between a recorded identity and the current one, in words."""
    if not recorded:
        return ["no identity recorded"]
    if "root" not in recorded:  # an index written before identities: JSON signatures only
        upgraded: SourceIdentity = {"root": now["root"], "json": cast(dict[str, str], dict(recorded))}
        if "media" in now:
            upgraded["media"] = now["media"]
        recorded = upgraded
    out = []
    if recorded.get("root") != now.get("root"):
        out.append(f"data root {recorded.get('root')} -> {now.get('root')}")
    old_json, new_json = recorded.get("json") or {}, now.get("json") or {}
    out += [
        f"{Path(now['root']) / f}"
        for f in sorted(set(old_json) | set(new_json))
        if old_json.get(f) != new_json.get(f)
    ]
    if "media" in now and recorded.get("media") != now.get("media"):
        old: Mapping[str, object] = recorded.get("media") or {}
        new = now["media"]
        out.append(
            f"media ({old.get('files', '?')} files, {old.get('bytes', '?')} bytes -> {new['files']} files, "
            f"{new['bytes']} bytes)"
        )
    return out
