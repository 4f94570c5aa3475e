"""Where a data source's files are, and what they are now: one module for the questions a run asks
of its data before it reads a sample.

- Its JSON files (``json_files``: the NExT-GPT folder layout's names for an objective).
- Its identity (``source_identity``): its resolved root, its JSON files and its media, as one record.
- Its shards (``source_shards``): the files a URL pattern names (``expand_shards``), or the version
  of shards written from exactly its current data (``locate_shards``).


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

import glob
import hashlib
import json
import os
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, cast

import braceexpand

from nextgpt import modality as modality_registry
from nextgpt.cache.store import file_signature
from nextgpt.data_source import DataSource, MediaListing, SourceIdentity
from nextgpt.runs import DataError

# --- a source's JSON files ---------------------------------------------------------------------
# objective -> the JSON files of a source in the NExT-GPT folder layout, in the order
# nextgpt_layout.OBJECTIVE_READERS reads them
JSON_FILES: dict[str, tuple[str, ...]] = {
    "caption": ("{name}.json",),
    "generate": ("{name}.json",),
    "instruct": ("{name}_comprehension.json", "{name}_generation.json"),
}


def json_files(name: str, root: str | Path, objective: str) -> list[Path]:
    if objective not in JSON_FILES:
        raise ValueError(f"unknown objective {objective!r}; known: {list(JSON_FILES)}")
    return [Path(root) / pattern.format(name=name) for pattern in JSON_FILES[objective]]


def read_utf8(path: Path) -> str:
    """A text file's contents; an error that names the file when it is not UTF-8."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8") from e


# --- its identity ------------------------------------------------------------------------------
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


# --- its shards --------------------------------------------------------------------------------
INDEX_SUFFIX = ".shards.json"


def shard_set(objective: str) -> str:
    return "instruct" if objective == "instruct" else "pairs"


def index_path(folder: Path, name: str, objective: str) -> Path:
    return folder / f"{name}-{shard_set(objective)}{INDEX_SUFFIX}"


def set_tars(folder: Path, name: str, objective: str) -> list[Path]:
    return sorted(folder.glob(f"{name}-{shard_set(objective)}-*.tar"))


def root_folder(shards_root: str | Path, name: str, root: str | Path) -> Path:
    """``${paths.shards}/<name>/<root folder name>-<hash of the resolved root>``: one root's versions."""
    resolved = Path(root).resolve()
    return Path(shards_root) / name / f"{resolved.name or 'root'}-{key_of(str(resolved), 10)}"


def version_folder(shards_root: str | Path, name: str, shard_set: str, ident: SourceIdentity) -> Path:
    return root_folder(shards_root, name, ident["root"]) / f"{shard_set}-{key_of(dict(ident))}"


def recorded_identity(folder: Path, name: str, objective: str) -> SourceIdentity | None:
    """The source identity a complete shard folder's index recorded (``{}``: none recorded; ``None``:
    the folder holds no complete shard set)."""
    index = index_path(folder, name, objective)
    if not index.is_file():
        return None
    return json.loads(read_utf8(index)).get("source") or SourceIdentity()


def root_versions(src: DataSource, objective: str, shards_root: str | Path) -> list[Path]:
    """Complete shard folders written from this source's root, newest first: the versions under
    its root folder, and the plain ``${paths.shards}/<name>/`` (``python -m datamodules.prepare``)
    where its index records this root."""
    name, folder = src.name, root_folder(shards_root, src.name, src.data_root)
    found = [
        p
        for p in folder.glob(f"{shard_set(objective)}-*")
        if p.is_dir() and recorded_identity(p, name, objective) is not None
    ]
    plain = Path(shards_root) / name
    recorded = recorded_identity(plain, name, objective)
    if recorded and recorded.get("root") == str(Path(src.data_root).resolve()):
        found.append(plain)
    return sorted(found, key=lambda p: index_path(p, name, objective).stat().st_mtime_ns, reverse=True)


def locate_shards(
    src: DataSource,
    objective: str,
    shards_root: str | Path,
    source_changed: str = "rewrite",
    media: str = "listing",
) -> tuple[Path | None, SourceIdentity | None]:
    """(the folder of the shards a source contributes to ``objective``, or ``None`` while there are
    none for its current data; the source's identity, ``None`` without a root). Given ``shards``: that
    folder. With a ``root``: the version written from exactly its current data (its identity, above),
    or under ``source_changed=keep`` the newest written from that root. Without: ``${paths.shards}/<name>``."""
    if src.shards:
        return Path(src.shards), None
    if not src.root:
        return Path(shards_root) / src.name, None
    ident = source_identity(src.root, src.name, src.modality, shard_set(objective), media)
    versions = root_versions(src, objective, shards_root)
    for folder in versions:
        if recorded_identity(folder, src.name, objective) == ident:
            return folder, ident
    if source_changed == "keep" and versions:
        return versions[0], ident
    return None, ident


def source_shards(
    src: DataSource,
    objective: str,
    shards_root: str | Path,
    source_changed: str = "rewrite",
    media: str = "listing",
) -> list[Path]:
    """The shard files a source contributes to ``objective`` (empty when none are written yet)."""
    if src.urls:
        return expand_shards(src.urls)
    folder, _ = locate_shards(src, objective, shards_root, source_changed, media)
    return set_tars(folder, src.name, objective) if folder and folder.is_dir() else []


def expand_shards(spec: str | Path | Iterable[str | Path], *, allow_repeats: bool = False) -> list[Path]:
    """Shard files from a folder (its ``*.tar``, sorted), a brace pattern, a glob, a file, or a list of these.

    A shard listed twice is an error (its samples would be read twice per pass) unless
    ``allow_repeats``: weighted mixtures repeat a source's shards on purpose."""
    items = [spec] if isinstance(spec, (str, Path)) else list(spec)
    out: list[Path] = []
    for item in items:
        for text in braceexpand.braceexpand(str(item)):
            p = Path(text)
            if p.is_dir():
                found = sorted(p.glob("*.tar"))
                if not found:
                    raise FileNotFoundError(f"shard folder {p} holds no .tar files")
                out += found
            elif any(ch in text for ch in "*?["):
                found = sorted(Path(f) for f in glob.glob(text))
                if not found:
                    raise FileNotFoundError(f"no shards match {text!r}")
                out += found
            elif p.is_file():
                out.append(p)
            else:
                raise FileNotFoundError(f"shard {p} does not exist (from {str(item)!r})")
    if not out:
        raise ValueError(f"no shards in {spec!r}")
    dupes = [p for p, n in Counter(p.resolve() for p in out).items() if n > 1]
    if dupes and not allow_repeats:
        raise ValueError(f"shard {dupes[0]} is listed twice: its samples would be read twice per pass")
    return out
