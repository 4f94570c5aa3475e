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

import io
import json
import logging
import math
from collections import Counter
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from datamodules.base import SourceDataModule, trainer_topology
from datamodules.shards import ShardSample, ShardStream, TrackingCollate, expand_shards
from datamodules.steps import EpochProgress, StepWindows
from nextgpt import modality as modality_registry
from nextgpt.batch import Collator, ConversationDataset, Item
from nextgpt.cache.encode import StoreLookup

log = logging.getLogger(__name__)


SOURCE_CHANGED = ("rewrite", "error", "keep")  # what a run does when a source's JSON changed after its shards


def shard_set(objective: str) -> str:
    return "instruct" if objective == "instruct" else "pairs"


def source_shards(src: Mapping[str, Any], objective: str, shards_root: str | Path) -> list[Path]:
    """The shard files a source contributes to ``objective`` (empty when none are written yet)."""
    if src.get("urls"):
        return expand_shards(src["urls"])
    folder = Path(src.get("shards") or Path(shards_root) / src["name"])
    return sorted(folder.glob(f"{src['name']}-{shard_set(objective)}-*.tar")) if folder.is_dir() else []


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
    ):
        super().__init__(sources, objective, model, template, batch_size, num_workers, max_length, seed, feature_cache,
                         cache_fallback, pairs, pack)
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
        """Write the shards of sources that have the NExT-GPT layout but no shards yet, and rewrite
        (or, with ``source_changed="error"``, refuse) those whose source JSON changed since."""
        from datamodules.prepare import prepare_nextgpt

        for src in self.sources:
            if src.get("urls"):
                continue
            root = src.get("root")
            folder = Path(src.get("shards") or Path(self.shards_root) / src["name"])
            existing = source_shards(src, self.objective, self.shards_root)
            if existing:
                changed = self.source_changes(src, folder)
                if not changed:
                    continue
                what = f"{', '.join(changed)} changed since the {shard_set(self.objective)} shards in {folder} were written"
                if self.source_changed == "error":
                    from nextgpt.runs import RunError

                    raise RunError(f"dataset source {src['name']!r}: {what}; rewrite them (dataset.source_changed="
                                   "rewrite, or python -m datamodules.prepare --overwrite)")
                if self.source_changed == "keep":
                    log.warning("data: %s; training on the old shards (dataset.source_changed=keep)", what)
                    continue
                log.info("data: %s: rewriting them", what)
            if not root or not (Path(root) / f"{src['name']}.json").is_file():
                raise FileNotFoundError(f"dataset source {src['name']!r}: no shards in {folder} and no NExT-GPT layout "
                                        f"at {root}/{src['name']}.json to write them from")
            log.info("data: writing %s shards of %r from %s into %s", shard_set(self.objective), src["name"], root, folder)
            folder.mkdir(parents=True, exist_ok=True)
            prepare_nextgpt(root, src["name"], src["modality"], folder, sets=[shard_set(self.objective)],
                            shard_size=self.shard_size, overwrite=True)

    def source_changes(self, src: Mapping[str, Any], folder: Path) -> list[str]:
        """The source JSON files whose signature differs from the one the shard index recorded
        (none when the source is not there: shards alone are a valid data set)."""
        from datamodules.nextgpt_layout import read_utf8
        from datamodules.prepare import INDEX_SUFFIX, source_signature

        root = src.get("root")
        if not root or not Path(root).is_dir():
            return []
        index = folder / f"{src['name']}-{shard_set(self.objective)}{INDEX_SUFFIX}"
        recorded = json.loads(read_utf8(index)).get("source") if index.is_file() else None
        now = source_signature(root, src["name"], shard_set(self.objective))
        if not recorded:  # shards from elsewhere, or written before signatures were kept
            return []
        return sorted(str(Path(root) / f) for f in set(now) | set(recorded) if now.get(f) != recorded.get(f))

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
            found = source_shards(src, self.objective, self.shards_root)
            if not found:
                raise FileNotFoundError(f"dataset source {src['name']!r}: no {shard_set(self.objective)} shards found "
                                        f"({src.get('urls') or Path(self.shards_root) / src['name']})")
            weight = int(src.get("weight", 1))
            paths += found * weight
            per_source.append(found)
            path_modality.update({p: src["modality"] for p in found})
            log.info("data: source %r: %d shards x weight %d", src["name"], len(found), weight)
            if self.feature_cache and self.objective == "caption":
                stores.update(self._feature_store(src, found))
        self.items = ConversationDataset([], self.tokenizer, self.layout, self.template,
                                         int(self.model_cfg["input_projector"]["num_tokens"]), self.max_length)
        self.stream = ShardStream(
            paths, objective=self.objective, pair_objective=None if self.objective == "instruct" else self.objective, seed=self.seed,
            shuffle=self.shuffle, epochs=None, transform=self._item, max_skip_fraction=self.max_skip_fraction,
            min_samples=self.min_samples, path_modality=path_modality, allow_repeats=True,
            feature_lookup=StoreLookup(stores) if stores else None,
            mix=self.mix, sources=per_source if self.mix == "balanced" else None,
            source_weights=[int(src.get("weight", 1)) for src in self.sources], batch_size=self.batch_size,
        )
        if self._pending_state is not None:
            self.stream.load_state_dict(self._pending_state)
            self._pending_state = None
        log.info("data: %r", self.stream)

    def caption_cache_bases(self) -> list[tuple[str, Path]]:
        """(modality, folder) where each source's caption embeddings are cached: beside its shards.
        Streamed captions are embedded as they come and added there (see nextgpt.cache.captions)."""
        from nextgpt.cache.encode import shard_folder
        from nextgpt.cache.store import cache_base

        out = []
        for src in self.sources:
            found = source_shards(src, self.objective, self.shards_root)
            if found:
                out.append((src["modality"], cache_base(shard_folder(src, found), self.cache_fallback)))
        return out

    def _feature_store(self, src: Mapping[str, Any], shards: list[Path]) -> dict[Path, Any]:
        """The ImageBind feature cache of a source's pair shards (``python -m nextgpt.cache``), for
        each of its shards; none when there is no cache for this encoder."""
        from nextgpt.cache.encode import shard_folder, shard_media_store

        store = shard_media_store(shard_folder(src, shards), src["modality"], "pairs", self.model_cfg["encoder"],
                                  self.cache_fallback)
        if not store.exists:
            log.info("data: no ImageBind feature cache for %r (python -m nextgpt.cache dataset=... builds one); "
                     "decoding and encoding its media on the fly", src["name"])
            return {}
        log.info("data: using ImageBind feature cache %s for %r: %d items cached (%d failed); the media of cached "
                 "items are not read", store.directory, src["name"], len(store), len(store.failed))
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
            self.stream, batch_size=None if self.mix == "balanced" else self.batch_size,  # balanced: it yields batches
            num_workers=self.num_workers,
            collate_fn=TrackingCollate(Collator(self.tokenizer.pad_token_id, self.items.num_media_tokens, self.pack_length)),
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
        from datamodules.nextgpt_layout import read_utf8
        from datamodules.prepare import INDEX_SUFFIX

        skipped: Counter = Counter()
        for src in self.sources:
            if src.get("urls"):
                continue
            folder = Path(src.get("shards") or Path(self.shards_root) / src["name"])
            index = folder / f"{src['name']}-{shard_set(self.objective)}{INDEX_SUFFIX}"
            if index.is_file():
                dropped = json.loads(read_utf8(index)).get("skipped", {})
                skipped.update({f"{src['name']}: {k} (writing shards)": int(v) * int(src.get("weight", 1))
                                for k, v in dropped.items()})
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
