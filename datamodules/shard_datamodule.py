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
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch.utils.data import DataLoader

from datamodules.base import SourceDataModule, trainer_topology
from datamodules.records import EpochState, StreamState
from datamodules.shard_versions import ShardVersions
from datamodules.shards import ShardStream, TrackingCollate
from datamodules.shards.sample import ShardSample
from datamodules.source_files import (
    expand_shards,
    index_path,
    json_files,
    read_utf8,
    recorded_identity,
    root_folder,
    set_tars,
    shard_set,
    source_shards,
)
from datamodules.steps import EpochProgress, StepWindows
from nextgpt import modality as modality_registry
from nextgpt.atomic import holding
from nextgpt.batch import Collator, ConversationDataset, Item
from nextgpt.cache.captions import CaptionTargets
from nextgpt.cache.encode import StoreLookup, shard_folder, shard_media_store
from nextgpt.cache.store import FeatureStore, cache_base
from nextgpt.data_source import DataSource, PairSettings, SourceEntry
from nextgpt.model_spec import ModelSpec
from nextgpt.runs import DataError

log = logging.getLogger(__name__)


def shard_path_errors(
    name: str, sources: Sequence[DataSource], objective: str, shards_root: str, source_changed: str
) -> list[str]:
    """Sharded sources with neither shards nor the layout they are written from (``name``:
    ``dataset.name``; ``shards_root``: ``paths.shards``; ``source_changed``: keep also reads the
    shards of a data root that is gone)."""
    errors = []
    keep = source_changed == "keep"
    for i, src in enumerate(sources):
        # the layout's JSON files this objective's shard set is written from (stage 3: both
        # instruction files, not <name>.json)
        layout = json_files(src.name, src.data_root, objective) if src.root else []
        missing = ", ".join(str(f) for f in layout if not f.is_file())
        has_json = bool(layout) and not missing
        if src.urls:
            if not source_shards(src, objective, shards_root):
                errors.append(f"dataset.sources[{i}].urls={src.urls!r}: no .tar shards there")
        elif src.shards:
            if not source_shards(src, objective, shards_root) and not has_json:
                errors.append(
                    f"dataset.sources[{i}].shards={src.shards!r}: no shards there and no "
                    f"{missing or 'data root'} to write them from"
                )
        elif not has_json and not (
            keep and src.root and source_shards(src, objective, shards_root, "keep", "none")
        ):
            what = f"{missing} does not exist" if src.root else "no data root"
            errors.append(
                f"dataset.sources[{i}].root={src.root!r}: {what} (dataset {name!r}; set "
                "paths.data_root=DIR; shards are only read for the data root they were written from: "
                "dataset.sources[i].shards=DIR names a folder of shards alone)"
            )
    return errors


class ShardDataModule(SourceDataModule):
    """Training batches from the shard stream, split over ranks x workers by sample.

    The stream has no end of its own (pass after pass, reshuffled per pass); an epoch is
    ``ceil(samples / (world_size x batch_size))`` full batches on every rank, so all ranks run the
    same number of steps even when bad samples are skipped unevenly, and any number of shards
    serves any number of ranks and workers (samples, not shards, are split).
    """

    def __init__(
        self,
        sources: Sequence[SourceEntry | DataSource],
        objective: str,
        model: ModelSpec,
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
        pairs: PairSettings | None = None,
        pack: bool = False,
        media_identity: str = "listing",
        name: str = "",
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
            name,
            media_identity,
        )
        self.folders: dict[str, Path] = {}  # source name -> the shard folder setup chose
        self._holds = contextlib.ExitStack()  # shared locks on the shard versions this run reads
        self.versions = ShardVersions(objective, shards_root, shard_size, source_changed, media_identity)
        self.source_changed = source_changed
        self.mix = mix
        self.shards_root, self.shuffle, self.shard_size = shards_root, shuffle, shard_size
        self.max_skip_fraction, self.min_samples = max_skip_fraction, min_samples
        self.stream: ShardStream | None = None
        self._pending_state: StreamState | None = None
        self.progress = EpochProgress()

    def path_errors(self) -> list[str]:
        """Sources with neither shards nor the layout they are written from."""
        return shard_path_errors(
            self.dataset_name, self.sources, self.objective, self.shards_root, self.source_changed
        )

    def prepare_data(self) -> None:
        """Write the shards of sources that have the NExT-GPT layout and no shards of their current
        data yet (``datamodules.source_files``); ``source_changed``: what to do when only shards of an
        earlier state of the source exist (rewrite: write the current; error: stop; keep: train on them)."""
        for src in self.sources:
            self.versions.prepare(src)

    def setup(self, stage: str | None = None) -> None:
        if self.stream is not None:
            return
        self.tokenizer, self.layout = self.tokenizer_and_layout()
        paths: list[Path] = []
        per_source: list[list[Path]] = []
        path_modality: dict[Path, str] = {}
        stores: dict[Path, FeatureStore] = {}
        for src in self.sources:
            found = self._shards(src)
            if not found:
                raise DataError(
                    f"dataset source {src.name!r}: no {shard_set(self.objective)} shards found "
                    f"({src.urls or src.shards or src.root})"
                )
            weight = src.weight
            paths += found * weight
            per_source.append(found)
            path_modality.update({p: src.modality for p in found})
            log.info("data: source %r: %d shards x weight %d", src.name, len(found), weight)
            if self.feature_cache and self.objective == "caption":
                stores.update(self._feature_store(src, found))
        self.items = ConversationDataset(
            [],
            self.tokenizer,
            self.layout,
            self.template,
            self.model_spec.input_projector.num_tokens,
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
            source_weights=[src.weight for src in self.sources],
            batch_size=self.batch_size,
        )
        if self._pending_state is not None:
            self.stream.load_state_dict(self._pending_state)
            self._pending_state = None
        log.info("data: %r", self.stream)

    @property
    def built_stream(self) -> ShardStream:
        """The stream ``setup`` built."""
        if self.stream is None:
            raise RuntimeError("the shard stream is built by setup(): call it first")
        return self.stream

    def _shards(self, src: DataSource) -> list[Path]:
        """The source's shard files, chosen once per run; a version written from a data root is
        held (a shared lock) so that no writer removes it while this run reads it."""
        if src.urls:
            return expand_shards(src.urls)
        if src.name not in self.folders:
            folder, ident = self.versions.folder(src)
            if folder is None:
                return []
            if ident is not None and folder.parent == root_folder(
                self.shards_root, src.name, src.data_root
            ):  # a version
                self._holds.enter_context(holding(Path(f"{folder}.lock"), shared=True))
                if recorded_identity(folder, src.name, self.objective) is None:
                    raise DataError(
                        f"dataset source {src.name!r}: the shards in {folder} were removed while this "
                        "run started; run it again"
                    )
            self.folders[src.name] = folder
        return set_tars(self.folders[src.name], src.name, self.objective)

    def teardown(self, stage: str | None = None) -> None:
        self._holds.close()

    def open_caption_stores(
        self,
        targets: CaptionTargets,
        *,
        device: torch.device | str,
        is_global_zero: bool = True,
        barrier: Callable[[], None] = lambda: None,
    ) -> None:
        """Attach each source's caption cache (beside its shards) to the stage's alignment targets:
        streamed captions are embedded as they come and added there (``nextgpt.cache.captions``)."""
        for src in self.sources:
            found = self._shards(src)
            conditioner = targets.conditioners.get(src.modality)
            if found and conditioner is not None:
                base = cache_base(shard_folder(src, found), self.cache_fallback)
                targets.attach(
                    src.modality, FeatureStore.at(base, f"text_{src.modality}", conditioner.fingerprint())
                )

    def _feature_store(self, src: DataSource, shards: list[Path]) -> dict[Path, FeatureStore]:
        """The ImageBind feature cache of a source's pair shards (``python -m nextgpt.cache``), for
        each of its shards; none when there is no cache for this encoder."""
        store = shard_media_store(
            shard_folder(src, shards),
            src.modality,
            "pairs",
            self.model_spec.encoder,
            self.cache_fallback,
        )
        if not store.exists:
            log.info(
                "data: no ImageBind feature cache for %r (python -m nextgpt.cache dataset=... builds one); "
                "decoding and encoding its media on the fly",
                src.name,
            )
            return {}
        log.info(
            "data: using ImageBind feature cache %s for %r: %d items cached (%d failed); the media of cached "
            "items are not read",
            store.directory,
            src.name,
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
            return self.built_stream.blocks_per_pass(world_size * workers) * workers
        return math.ceil(self.built_stream.total / (world_size * self.batch_size))

    def train_dataloader(self) -> StepWindows:
        _, world, accumulate = trainer_topology(self.trainer)
        loader = DataLoader(
            self.built_stream,
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
                self.built_stream.mark_consumed(positions)
        self.count_delivered()  # a Lightning epoch is a number of batches; the stream runs on across epochs
        return batch

    def skipped_before_training(self) -> tuple[Counter, int]:
        """(samples the shard writer dropped, by reason, e.g. media files that were missing; all
        samples written or dropped)."""
        skipped: Counter = Counter()
        for src in self.sources:
            if src.urls or src.name not in self.folders:
                continue
            index = index_path(self.folders[src.name], src.name, self.objective)
            if index.is_file():
                dropped = json.loads(read_utf8(index)).get("skipped", {})
                skipped.update(
                    {f"{src.name}: {k} (writing shards)": int(v) * src.weight for k, v in dropped.items()}
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
            self.progress.load_state_dict(cast(EpochState, dict(state["progress"])))
        if "train_stream" not in state:
            return
        if self.stream is None:
            self._pending_state = cast(StreamState, dict(state["train_stream"]))
        else:
            self.stream.load_state_dict(state["train_stream"])
