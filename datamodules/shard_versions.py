"""Where a source's shards are and which version is current: shard sets written from a data root
are versions of their own (``datamodules.source_files``), written beside older ones and removed once no
run reads them; shards named by the config (``dataset.sources[i].shards``) are written in place."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from datamodules.prepare import prepare_nextgpt
from datamodules.source_files import (
    SET_OBJECTIVE,
    differences,
    index_path,
    json_files,
    locate_shards,
    read_utf8,
    recorded_identity,
    root_versions,
    shard_set,
    source_identity,
    version_folder,
)
from nextgpt.atomic import Busy, building, holding, install
from nextgpt.data_source import DataSource, SourceIdentity
from nextgpt.runs import DataError, RunError

log = logging.getLogger(__name__)

SOURCE_CHANGED = ("rewrite", "error", "keep")  # what a run does when a source's JSON changed after its shards


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
        yet (``datamodules.source_files``); ``source_changed``: what to do when only shards of an earlier
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
