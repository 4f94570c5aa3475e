"""The DataModule for WebDataset shards: one stream over every source's shards, mixed by weight,
split exactly over ranks x workers, resumable mid-epoch through the Lightning checkpoint.

Sources are ``{name, modality, weight, root?, shards?, urls?}``:

- ``urls``: shards as they are (a folder, a brace pattern or a glob), e.g. what img2dataset or
  video2dataset wrote; plain ``{key}.jpg + {key}.txt`` pairs take the source's ``modality``.
- otherwise ``shards`` (default ``${paths.shards}/<name>``) holding ``<name>-pairs-*.tar`` (stages 1
  and 2) and ``<name>-instruct-*.tar`` (stage 3). Where they are missing but the NExT-GPT layout is
  under ``root``, ``prepare_data`` writes them first (``python -m datamodules.prepare`` does the same).

``weight`` (a positive integer) is how many times a source is read per pass: the mixture is exact
and deterministic, so resume stays exact too.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import shutil
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from datamodules.base import SourceDataModule, trainer_topology
from datamodules.identity import SET_OBJECTIVE, differences, root_folder, source_identity, version_folder
from datamodules.nextgpt_layout import json_files, read_utf8
from datamodules.prepare import INDEX_SUFFIX, prepare_nextgpt
from datamodules.shards import ShardSample, ShardStream, TrackingCollate, expand_shards
from datamodules.steps import EpochProgress, StepWindows
from nextgpt import modality as modality_registry
from nextgpt.atomic import Busy, building, holding, install
from nextgpt.batch import Collator, ConversationDataset, Item
from nextgpt.cache.encode import StoreLookup
from nextgpt.runs import DataError, RunError

log = logging.getLogger(__name__)


SOURCE_CHANGED = ("rewrite", "error", "keep")  # what a run does when a source's JSON changed after its shards


def shard_set(objective: str) -> str:
    return "instruct" if objective == "instruct" else "pairs"


def _index(folder: Path, name: str, objective: str) -> Path:
    return folder / f"{name}-{shard_set(objective)}{INDEX_SUFFIX}"


def _tars(folder: Path, name: str, objective: str) -> list[Path]:
    return sorted(folder.glob(f"{name}-{shard_set(objective)}-*.tar"))


def _recorded(folder: Path, name: str, objective: str) -> dict | None:
    """The source identity a complete shard folder's index recorded (``{}``: none recorded; ``None``:
    the folder holds no complete shard set)."""
    index = _index(folder, name, objective)
    if not index.is_file():
        return None
    return json.loads(read_utf8(index)).get("source") or {}


def _versions(src: Mapping[str, Any], objective: str, shards_root: str | Path) -> list[Path]:
    """Complete shard folders written from this source's root, newest first: the versions under
    its root folder, and the plain ``${paths.shards}/<name>/`` (``python -m datamodules.prepare``)
    where its index records this root."""
    name, folder = src["name"], root_folder(shards_root, src["name"], src["root"])
    found = [
        p
        for p in folder.glob(f"{shard_set(objective)}-*")
        if p.is_dir() and _recorded(p, name, objective) is not None
    ]
    plain = Path(shards_root) / name
    recorded = _recorded(plain, name, objective)
    if recorded and recorded.get("root") == str(Path(src["root"]).resolve()):
        found.append(plain)
    return sorted(found, key=lambda p: _index(p, name, objective).stat().st_mtime_ns, reverse=True)


def locate_shards(
    src: Mapping[str, Any],
    objective: str,
    shards_root: str | Path,
    source_changed: str = "rewrite",
    media: str = "listing",
) -> tuple[Path | None, dict | None]:
    """(the folder of the shards a source contributes to ``objective``, or ``None`` while there are
    none for its current data; the source's identity, ``None`` without a root). Given ``shards``: that
    folder. With a ``root``: the version written from exactly its current data (``datamodules.identity``),
    or under ``source_changed=keep`` the newest written from that root. Without: ``${paths.shards}/<name>``."""
    if src.get("shards"):
        return Path(src["shards"]), None
    if not src.get("root"):
        return Path(shards_root) / src["name"], None
    ident = source_identity(src["root"], src["name"], src["modality"], shard_set(objective), media)
    versions = _versions(src, objective, shards_root)
    for folder in versions:
        if _recorded(folder, src["name"], objective) == ident:
            return folder, ident
    if source_changed == "keep" and versions:
        return versions[0], ident
    return None, ident


def source_shards(
    src: Mapping[str, Any],
    objective: str,
    shards_root: str | Path,
    source_changed: str = "rewrite",
    media: str = "listing",
) -> list[Path]:
    """The shard files a source contributes to ``objective`` (empty when none are written yet)."""
    if src.get("urls"):
        return expand_shards(src["urls"])
    folder, _ = locate_shards(src, objective, shards_root, source_changed, media)
    return _tars(folder, src["name"], objective) if folder and folder.is_dir() else []


class ShardDataModule(SourceDataModule):
    """Training batches from the shard stream, split over ranks x workers by sample.

    The stream has no end of its own (pass after pass, reshuffled per pass); an epoch is
    ``ceil(samples / (world_size x batch_size))`` full batches on every rank, so all ranks run the
    same number of steps even when bad samples are skipped unevenly, and any number of shards
    serves any number of ranks and workers (samples, not shards, are split).
    """

    def __init__(
        self,
        sources: Sequence[Mapping[str, Any]],
        objective: str,
        model: Mapping[str, Any],
        template: str = "vicuna_v0",
        batch_size: int = 4,
        num_workers: int = 0,
        max_length: int = 512,
        seed: int = 0,
        shards_root: str = "shards",
        shuffle: bool = True,
        shard_size: int = 1000,
        max_skip_fraction: float = 0.1,
        min_samples: int = 20,
        cache_fallback: str | None = None,
        source_changed: str = "rewrite",
        feature_cache: bool = True,
        mix: str = "weighted",
        pairs: Mapping[str, Any] | None = None,
        pack: bool = False,
        media_identity: str = "listing",
    ):
        super().__init__(
            sources,
            objective,
            model,
            template,
            batch_size,
            num_workers,
            max_length,
            seed,
            feature_cache,
            cache_fallback,
            pairs,
            pack,
        )
        self.media_identity = media_identity
        self.folders: dict[str, Path] = {}  # source name -> the shard folder setup chose
        self._holds = contextlib.ExitStack()  # shared locks on the shard versions this run reads
        if source_changed not in SOURCE_CHANGED:
            raise ValueError(f"source_changed must be one of {SOURCE_CHANGED}, got {source_changed!r}")
        self.source_changed = source_changed
        self.mix = mix
        self.shards_root, self.shuffle, self.shard_size = shards_root, shuffle, shard_size
        self.max_skip_fraction, self.min_samples = max_skip_fraction, min_samples
        self.stream: ShardStream | None = None
        self._pending_state: dict | None = None
        self.progress = EpochProgress()

    def prepare_data(self) -> None:
        """Write the shards of sources that have the NExT-GPT layout and no shards of their current
        data yet (``datamodules.identity``); ``source_changed``: what to do when only shards of an
        earlier state of the source exist (rewrite: write the current; error: stop; keep: train on them)."""
        for src in self.sources:
            if src.get("urls"):
                continue
            if src.get("shards"):
                self._prepare_given(src)
                continue
            folder, ident = self._folder(src)
            if folder is not None:
                recorded = _recorded(folder, src["name"], self.objective)
                if ident is not None and recorded != ident:
                    log.warning(
                        "data: %s differs from the shards in %s (%s); training on them "
                        "(dataset.source_changed=keep)",
                        src["root"],
                        folder,
                        "; ".join(differences(recorded, ident)),
                    )
                continue
            if not src.get("root") or not Path(src["root"]).is_dir():
                raise DataError(
                    f"dataset source {src['name']!r}: the data root {src.get('root')} does not exist, and "
                    f"no shards in {Path(self.shards_root) / src['name']} were written from it "
                    "(set paths.data_root=DIR, or dataset.sources[i].shards=DIR for shards alone)"
                )
            older = _versions(src, self.objective, self.shards_root)
            if older:
                what = "; ".join(differences(_recorded(older[0], src["name"], self.objective), ident))
                if self.source_changed == "error":
                    raise RunError(
                        f"dataset source {src['name']!r} changed since its {shard_set(self.objective)} "
                        f"shards in {older[0]} were written ({what}); write them anew "
                        "(dataset.source_changed=rewrite) or train on them (keep)"
                    )
                log.info(
                    "data: %s changed since the shards in %s were written (%s): writing shards of its current "
                    "data",
                    src["root"],
                    older[0],
                    what,
                )
            self._write_version(src, ident)

    def _folder(self, src: Mapping[str, Any]) -> tuple[Path | None, dict | None]:
        return locate_shards(src, self.objective, self.shards_root, self.source_changed, self.media_identity)

    def _write(self, src: Mapping[str, Any], out: Path, ident: Mapping[str, Any] | None) -> None:
        """The source's shard set into ``out``; a source with no usable sample is an error that
        names its JSON files (nothing is written)."""
        log.info(
            "data: writing %s shards of %r from %s into %s",
            shard_set(self.objective),
            src["name"],
            src["root"],
            out,
        )
        prepare_nextgpt(
            src["root"],
            src["name"],
            src["modality"],
            out,
            sets=[shard_set(self.objective)],
            shard_size=self.shard_size,
            overwrite=True,
            identity=ident,
            media=self.media_identity,
        )
        index = json.loads(read_utf8(_index(out, src["name"], self.objective)))
        if not index["total"]:
            files = ", ".join(
                str(f) for f in json_files(src["name"], src["root"], SET_OBJECTIVE[shard_set(self.objective)])
            )
            raise DataError(
                f"dataset source {src['name']!r}: no usable sample in {files}: "
                + (
                    f"every entry was skipped ({index['skipped']})"
                    if index["skipped"]
                    else "they hold no entries"
                )
            )

    def _write_version(self, src: Mapping[str, Any], ident: Mapping[str, Any]) -> None:
        """Write the shards of the source's current data as a version of their own (never over shards
        another run may be reading), under a lock that concurrent writers of this root wait on; then
        remove the older versions that no run holds."""
        target = version_folder(self.shards_root, src["name"], shard_set(self.objective), ident)

        def waiting(holder: str) -> None:
            log.info("data: waiting for %s, which is writing shards of %s", holder, src["root"])

        with holding(target.parent / ".writer.lock", on_wait=waiting):
            if _recorded(target, src["name"], self.objective) is None:
                with building(target, "writing") as tmp:
                    self._write(src, tmp, ident)
                    install(tmp, target)
            for old in _versions(src, self.objective, self.shards_root):
                if old == target or old.parent != target.parent:
                    continue
                try:
                    with holding(Path(f"{old}.lock"), wait=False):
                        shutil.rmtree(old)
                    Path(f"{old}.lock").unlink(missing_ok=True)
                    log.info("data: removed the older shards %s (no run reads them)", old)
                except Busy:
                    log.info("data: keeping the older shards %s: a run still reads them", old)

    def _prepare_given(self, src: Mapping[str, Any]) -> None:
        """Shards in a folder the config names (``dataset.sources[i].shards``): written there when
        missing, rewritten in place when the source's data changed (``source_changed``)."""
        folder, root = Path(src["shards"]), src.get("root")
        recorded = _recorded(folder, src["name"], self.objective)
        ident = (
            source_identity(
                root, src["name"], src["modality"], shard_set(self.objective), self.media_identity
            )
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
                    f"dataset source {src['name']!r}: {what}; rewrite them (dataset.source_changed="
                    "rewrite, or python -m datamodules.prepare --overwrite)"
                )
            if self.source_changed == "keep":
                log.warning("data: %s; training on the old shards (dataset.source_changed=keep)", what)
                return
            log.info("data: %s: rewriting them", what)
        if ident is None:
            raise DataError(
                f"dataset source {src['name']!r}: no shards in {folder} and no NExT-GPT layout at "
                f"{root}/{src['name']}.json to write them from"
            )
        with holding(folder / ".writer.lock"):
            self._write(src, folder, ident)

    def setup(self, stage: str | None = None) -> None:
        if self.stream is not None:
            return
        from nextgpt.model import load_tokenizer

        self.tokenizer, self.layout = load_tokenizer(self.model_cfg)
        paths: list[Path] = []
        per_source: list[list[Path]] = []
        path_modality: dict[Path, str] = {}
        stores: dict[Path, Any] = {}
        for src in self.sources:
            found = self._shards(src)
            if not found:
                raise DataError(
                    f"dataset source {src['name']!r}: no {shard_set(self.objective)} shards found "
                    f"({src.get('urls') or src.get('shards') or src.get('root')})"
                )
            weight = int(src.get("weight", 1))
            paths += found * weight
            per_source.append(found)
            path_modality.update({p: src["modality"] for p in found})
            log.info("data: source %r: %d shards x weight %d", src["name"], len(found), weight)
            if self.feature_cache and self.objective == "caption":
                stores.update(self._feature_store(src, found))
        self.items = ConversationDataset(
            [],
            self.tokenizer,
            self.layout,
            self.template,
            int(self.model_cfg["input_projector"]["num_tokens"]),
            self.max_length,
        )
        self.stream = ShardStream(
            paths,
            objective=self.objective,
            pair_objective=None if self.objective == "instruct" else self.objective,
            seed=self.seed,
            shuffle=self.shuffle,
            epochs=None,
            transform=self._item,
            max_skip_fraction=self.max_skip_fraction,
            min_samples=self.min_samples,
            path_modality=path_modality,
            allow_repeats=True,
            feature_lookup=StoreLookup(stores) if stores else None,
            mix=self.mix,
            sources=per_source if self.mix == "balanced" else None,
            source_weights=[int(src.get("weight", 1)) for src in self.sources],
            batch_size=self.batch_size,
        )
        if self._pending_state is not None:
            self.stream.load_state_dict(self._pending_state)
            self._pending_state = None
        log.info("data: %r", self.stream)

    def _shards(self, src: Mapping[str, Any]) -> list[Path]:
        """The source's shard files, chosen once per run; a version written from a data root is
        held (a shared lock) so that no writer removes it while this run reads it."""
        if src.get("urls"):
            return expand_shards(src["urls"])
        if src["name"] not in self.folders:
            folder, ident = self._folder(src)
            if folder is None:
                return []
            if ident is not None and folder.parent == root_folder(
                self.shards_root, src["name"], src["root"]
            ):  # a version
                self._holds.enter_context(holding(Path(f"{folder}.lock"), shared=True))
                if _recorded(folder, src["name"], self.objective) is None:
                    raise DataError(
                        f"dataset source {src['name']!r}: the shards in {folder} were removed while this "
                        "run started; run it again"
                    )
            self.folders[src["name"]] = folder
        return _tars(self.folders[src["name"]], src["name"], self.objective)

    def teardown(self, stage: str | None = None) -> None:
        self._holds.close()

    def caption_cache_bases(self) -> list[tuple[str, Path]]:
        """(modality, folder) where each source's caption embeddings are cached: beside its shards.
        Streamed captions are embedded as they come and added there (see nextgpt.cache.captions)."""
        from nextgpt.cache.encode import shard_folder
        from nextgpt.cache.store import cache_base

        out = []
        for src in self.sources:
            found = self._shards(src)
            if found:
                out.append((src["modality"], cache_base(shard_folder(src, found), self.cache_fallback)))
        return out

    def _feature_store(self, src: Mapping[str, Any], shards: list[Path]) -> dict[Path, Any]:
        """The ImageBind feature cache of a source's pair shards (``python -m nextgpt.cache``), for
        each of its shards; none when there is no cache for this encoder."""
        from nextgpt.cache.encode import shard_folder, shard_media_store

        store = shard_media_store(
            shard_folder(src, shards),
            src["modality"],
            "pairs",
            self.model_cfg["encoder"],
            self.cache_fallback,
        )
        if not store.exists:
            log.info(
                "data: no ImageBind feature cache for %r (python -m nextgpt.cache dataset=... builds one); "
                "decoding and encoding its media on the fly",
                src["name"],
            )
            return {}
        log.info(
            "data: using ImageBind feature cache %s for %r: %d items cached (%d failed); the media of cached "
            "items are not read",
            store.directory,
            src["name"],
            len(store),
            len(store.failed),
        )
        return {p: store for p in shards}

    def _item(self, sample: ShardSample) -> Item:
        """Tokenise a streamed sample; its media come from the feature cache or the tar members' bytes."""

        def load(name: str, member: str):
            if member in sample.features:
                return torch.from_numpy(np.asarray(sample.features[member], dtype=np.float32)), True
            data = io.BytesIO(sample.media[member])
            data.name = f"{sample.shard}:{member}"
            return modality_registry.get(name).load(data), False

        return self.items.build_item(self.pair_style.apply(sample.conversation), load)

    def batches_per_epoch(self, world_size: int) -> int:
        """Enough full batches on every rank to cover one pass; a rank whose share runs short takes
        the first samples of the next pass. Balanced mix: every source's turns until the largest
        is used up, on each of the rank's workers."""
        if self.mix == "balanced":
            workers = max(1, self.num_workers)
            return self.stream.blocks_per_pass(world_size * workers) * workers
        return math.ceil(self.stream.total / (world_size * self.batch_size))

    def train_dataloader(self) -> StepWindows:
        _, world, accumulate = trainer_topology(self.trainer)
        loader = DataLoader(
            self.stream,
            batch_size=None if self.mix == "balanced" else self.batch_size,  # balanced: it yields batches
            num_workers=self.num_workers,
            collate_fn=TrackingCollate(
                Collator(self.tokenizer.pad_token_id, self.items.num_media_tokens, self.pack_length)
            ),
            persistent_workers=False,
        )
        return StepWindows(loader, accumulate, limit=self.batches_per_epoch(world), progress=self.progress)

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        if batch is not None and "stream_positions" in batch:
            positions = batch.pop("stream_positions")
            reasons: dict[str, int] = {}
            for p in positions:  # skips since the previous delivered sample, by reason
                for reason, n in p.skipped:
                    reasons[reason] = reasons.get(reason, 0) + n
            batch["num_skipped"] = batch.get("num_skipped", 0) + sum(reasons.values())
            batch["skipped_by_reason"] = reasons
            if self.trainer is None or self.trainer.training:
                self.stream.mark_consumed(positions)
        self.count_delivered()  # a Lightning epoch is a number of batches; the stream runs on across epochs
        return batch

    def skipped_before_training(self) -> tuple[Counter, int]:
        """(samples the shard writer dropped, by reason, e.g. media files that were missing; all
        samples written or dropped)."""
        skipped: Counter = Counter()
        for src in self.sources:
            if src.get("urls") or src["name"] not in self.folders:
                continue
            index = _index(self.folders[src["name"]], src["name"], self.objective)
            if index.is_file():
                dropped = json.loads(read_utf8(index)).get("skipped", {})
                skipped.update(
                    {
                        f"{src['name']}: {k} (writing shards)": int(v) * int(src.get("weight", 1))
                        for k, v in dropped.items()
                    }
                )
        return skipped, (self.stream.total if self.stream is not None else 0) + sum(skipped.values())

    @property
    def skipped(self):
        return self.stream.skipped if self.stream is not None else {}

    def state_dict(self) -> dict[str, Any]:
        if self.stream is None:
            return {}
        return {"train_stream": self.stream.state_dict(), "progress": self.progress.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "progress" in state:
            self.progress.load_state_dict(dict(state["progress"]))
        if "train_stream" not in state:
            return
        if self.stream is None:
            self._pending_state = dict(state["train_stream"])
        else:
            self.stream.load_state_dict(state["train_stream"])
