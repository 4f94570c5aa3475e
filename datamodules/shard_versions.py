"""Where a source's shards are and which version is current: shard sets written from a data root
are versions of their own (``datamodules.identity``), written beside older ones and removed once no
run reads them; shards named by the config (``dataset.sources[i].shards``) are written in place."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from datamodules.data_source import DataSource
from datamodules.identity import SET_OBJECTIVE, differences, root_folder, source_identity, version_folder
from datamodules.nextgpt_layout import json_files, read_utf8
from datamodules.prepare import prepare_nextgpt
from datamodules.records import SourceIdentity
from datamodules.shard_writer import INDEX_SUFFIX
from datamodules.shards.files import expand_shards
from nextgpt.atomic import Busy, building, holding, install
from nextgpt.runs import DataError, RunError

log = logging.getLogger(__name__)

SOURCE_CHANGED = ("rewrite", "error", "keep")  # what a run does when a source's JSON changed after its shards


def shard_set(objective: str) -> str:
    return "instruct" if objective == "instruct" else "pairs"


def index_path(folder: Path, name: str, objective: str) -> Path:
    return folder / f"{name}-{shard_set(objective)}{INDEX_SUFFIX}"


def set_tars(folder: Path, name: str, objective: str) -> list[Path]:
    return sorted(folder.glob(f"{name}-{shard_set(objective)}-*.tar"))


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
    folder. With a ``root``: the version written from exactly its current data (``datamodules.identity``),
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


class ShardVersions:
    """Writes the shard sets one objective reads (``shard_set``) of NExT-GPT-layout sources, and
    keeps them current: ``source_changed`` says what happens when the source changed since."""

    def __init__(
        self,
        objective: str,
        shards_root: str | Path,
        shard_size: int = 1000,
        source_changed: str = "rewrite",
        media_identity: str = "listing",
    ):
        if source_changed not in SOURCE_CHANGED:
            raise ValueError(f"source_changed must be one of {SOURCE_CHANGED}, got {source_changed!r}")
        self.objective, self.shards_root, self.shard_size = objective, shards_root, shard_size
        self.source_changed, self.media_identity = source_changed, media_identity

    def prepare(self, src: DataSource) -> None:
        """Write the source's shards where it has the NExT-GPT layout and no shards of its current data
        yet (``datamodules.identity``); ``source_changed``: what to do when only shards of an earlier
        state of the source exist (rewrite: write the current; error: stop; keep: train on them)."""
        if src.urls:
            return
        if src.shards:
            self._prepare_given(src, Path(src.shards))
            return
        folder, ident = self.folder(src)
        if folder is not None:
            recorded = recorded_identity(folder, src.name, self.objective)
            if ident is not None and recorded != ident:
                log.warning(
                    "data: %s differs from the shards in %s (%s); training on them "
                    "(dataset.source_changed=keep)",
                    src.root,
                    folder,
                    "; ".join(differences(recorded, ident)),
                )
            return
        if ident is None or not Path(src.data_root).is_dir():  # ident is None: the source names no root
            raise DataError(
                f"dataset source {src.name!r}: the data root {src.root} does not exist, and "
                f"no shards in {Path(self.shards_root) / src.name} were written from it "
                "(set paths.data_root=DIR, or dataset.sources[i].shards=DIR for shards alone)"
            )
        older = root_versions(src, self.objective, self.shards_root)
        if older:
            what = "; ".join(differences(recorded_identity(older[0], src.name, self.objective), ident))
            if self.source_changed == "error":
                raise RunError(
                    f"dataset source {src.name!r} changed since its {shard_set(self.objective)} "
                    f"shards in {older[0]} were written ({what}); write them anew "
                    "(dataset.source_changed=rewrite) or train on them (keep)"
                )
            log.info(
                "data: %s changed since the shards in %s were written (%s): writing shards of its current "
                "data",
                src.root,
                older[0],
                what,
            )
        self._write_version(src, ident)

    def folder(self, src: DataSource) -> tuple[Path | None, SourceIdentity | None]:
        return locate_shards(src, self.objective, self.shards_root, self.source_changed, self.media_identity)

    def _write(self, src: DataSource, out: Path, ident: SourceIdentity | None) -> None:
        """The source's shard set into ``out``; a source with no usable sample is an error that
        names its JSON files (nothing is written)."""
        log.info(
            "data: writing %s shards of %r from %s into %s",
            shard_set(self.objective),
            src.name,
            src.root,
            out,
        )
        prepare_nextgpt(
            src.data_root,
            src.name,
            src.modality,
            out,
            sets=[shard_set(self.objective)],
            shard_size=self.shard_size,
            overwrite=True,
            identity=ident,
            media=self.media_identity,
        )
        index = json.loads(read_utf8(index_path(out, src.name, self.objective)))
        if not index["total"]:
            files = ", ".join(
                str(f) for f in json_files(src.name, src.data_root, SET_OBJECTIVE[shard_set(self.objective)])
            )
            raise DataError(
                f"dataset source {src.name!r}: no usable sample in {files}: "
                + (
                    f"every entry was skipped ({index['skipped']})"
                    if index["skipped"]
                    else "they hold no entries"
                )
            )

    def _write_version(self, src: DataSource, ident: SourceIdentity) -> None:
        """Write the shards of the source's current data as a version of their own (never over shards
        another run may be reading), under a lock that concurrent writers of this root wait on; then
        remove the older versions that no run holds."""
        target = version_folder(self.shards_root, src.name, shard_set(self.objective), ident)

        def waiting(holder: str) -> None:
            log.info("data: waiting for %s, which is writing shards of %s", holder, src.root)

        with holding(target.parent / ".writer.lock", on_wait=waiting):
            if recorded_identity(target, src.name, self.objective) is None:
                with building(target, "writing") as tmp:
                    self._write(src, tmp, ident)
                    install(tmp, target)
            for old in root_versions(src, self.objective, self.shards_root):
                if old == target or old.parent != target.parent:
                    continue
                try:
                    with holding(Path(f"{old}.lock"), wait=False):
                        shutil.rmtree(old)
                    Path(f"{old}.lock").unlink(missing_ok=True)
                    log.info("data: removed the older shards %s (no run reads them)", old)
                except Busy:
                    log.info("data: keeping the older shards %s: a run still reads them", old)

    def _prepare_given(self, src: DataSource, folder: Path) -> None:
        """Shards in a folder the config names (``dataset.sources[i].shards``): written there when
        missing, rewritten in place when the source's data changed (``source_changed``)."""
        root = src.root
        recorded = recorded_identity(folder, src.name, self.objective)
        ident = (
            source_identity(root, src.name, src.modality, shard_set(self.objective), self.media_identity)
            if root and Path(root).is_dir()
            else None
        )
        if recorded is not None:
            changed = differences(recorded, ident) if recorded and ident else []
            if not changed:
                return
            what = f"{'; '.join(changed)} changed since the shards in {folder} were written"
            if self.source_changed == "error":
                raise RunError(
                    f"dataset source {src.name!r}: {what}; rewrite them (dataset.source_changed="
                    "rewrite, or python -m datamodules.prepare --overwrite)"
                )
            if self.source_changed == "keep":
                log.warning("data: %s; training on the old shards (dataset.source_changed=keep)", what)
                return
            log.info("data: %s: rewriting them", what)
        if ident is None:
            raise DataError(
                f"dataset source {src.name!r}: no shards in {folder} and no NExT-GPT layout at "
                f"{root}/{src.name}.json to write them from"
            )
        with holding(folder / ".writer.lock"):
            self._write(src, folder, ident)
