"""Reading shards: an exact, resumable, fault-tolerant stream of conversations from WebDataset tars.

Reads the shards :mod:`datamodules.prepare` writes (``{key}.json`` records of kind ``pair`` or
``conversation``) and, unconverted, those img2dataset / video2dataset write (``{key}.jpg|.mp4`` +
``{key}.txt`` caption): a sample with a caption and one media member is a text-X pair of the
stream's ``modality``. A pair becomes a caption (stage 1) or a generate (stage 2) conversation by
the stream's objective, with the instruction :mod:`datamodules.nextgpt_layout` picks for the same key.

**Order and split.** Each pass (epoch) has one global sample order: shards in the given order,
samples in tar order; with ``shuffle=True`` the shards are permuted (seed, epoch) and taken in
groups of ``shuffle_shards``, whose (shard, sample) pairs are permuted (seed, epoch, group). Sample
``i`` of that order belongs to consumer ``i % C``, ``C = world_size * num_workers`` (a consumer is
one dataloader worker of one rank). Every sample goes to exactly one consumer, for any number of
shards (fewer shards than workers included); consumers get equal counts up to one sample.

**Cost.** Each consumer reads the tar headers of every shard it has samples in (with ``C`` below
the shard size that is every shard) and the data of its own samples only: header I/O is ``C``
times the headers (512 bytes a member), data I/O is read once in total. Shards are opened for
random access, so they must be seekable files (local disk, NFS, a FUSE mount of an object store),
not ``pipe:`` URLs. Sample counts come from the writer's ``{name}.shards.json``, img2dataset's
``{shard}_stats.json`` or, failing both, one header scan at construction.

**Resume.** The state is, per consumer, the last (pass, global index) handed over, plus the seed,
a fingerprint of the shard list and the worker rotation (which worker delivers the next batch).
A stream restarted from it continues each consumer exactly after its last sample, and rotates the
worker slots so the dataloader interleaves batches as the uninterrupted run would: the keys after
resuming at step k equal the uninterrupted run's keys from step k. What counts as handed over:

- iterating the stream in this process (no dataloader workers): every sample yielded;
- with workers, the yields happen in copies of the stream, so the training process reports what
  the training step actually received with :meth:`ShardStream.mark_consumed` (see
  :class:`TrackingCollate`); prefetched, unconsumed batches are then produced again after a
  restart, never lost. Use ``persistent_workers=False``: persistent workers keep a stale copy.

Resuming needs the same shards, seed, ``world_size`` and ``num_workers``. ``epochs=None`` streams
pass after pass with no end: use it with ``max_steps`` under DDP, where a finite pass can leave
ranks with unequal batch counts (a hang at the epoch end). A finite stream (``epochs=1``) advances
its pass by itself when iterated in this process; with workers call :meth:`set_epoch` before each
pass (Lightning: ``on_train_epoch_start``).

**Bad samples** (unreadable or mistyped JSON, missing or empty caption, missing media member,
undecodable media, placeholder mismatch) are skipped, counted by reason in ``skipped``, and logged
with ``shard:key``; the next good sample follows. Media decoding belongs to the stream when a
``transform`` is given (e.g. the data module's tokenise-and-decode function):
:class:`~nextgpt.encoders.preprocess.MediaDecodeError` and
:class:`~datamodules.shards.sample.SkipSample` raised by it count
as skips too. Code that decodes elsewhere calls :meth:`ShardStream.record_skip`. Past
``min_samples`` seen, a skipped fraction above ``max_skip_fraction`` raises
:class:`~datamodules.shards.skips.TooManySkipped`.
A skip is counted, logged and held against the limit once, where the sample is handed over: read in
this process, as it is read; read by a dataloader worker, when the training side receives the next
sample (:meth:`ShardStream.mark_consumed`). Workers read ahead, and what they read but the trainer
never received is read again by the next epoch's workers: counted in the worker, it was counted
(and warned about) twice, and the limit checked on read-ahead (4 of 33 for 1 bad sample in 11).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from datamodules.records import StreamState
from datamodules.shards.files import OpenShards, TarSamples, shard_counts
from datamodules.shards.mix import BalancedOrder
from datamodules.shards.order import WeightedOrder
from datamodules.shards.progress import StreamProgress
from datamodules.shards.records import FeatureLookup, RecordReader
from datamodules.shards.sample import ShardSample, SkipSample, StreamPosition
from datamodules.shards.skips import PassWatch, SkipLedger
from datamodules.source_files import expand_shards
from nextgpt.encoders.preprocess import MediaDecodeError

log = logging.getLogger(__name__)

STATE_VERSION = 1
MIXES = ("weighted", "balanced")


class ShardStream(IterableDataset):
    """Samples of WebDataset shards, split exactly over ranks and workers; see the module docstring.

    Composed of: the shard files (:mod:`.files`), the order of a pass and each consumer's share of
    it (:mod:`.order`, :mod:`.mix` for ``mix="balanced"``), the resumable position in it
    (:mod:`.progress`), the records' reading (:mod:`.records`) and the bad-sample accounting
    (:mod:`.skips`)."""

    def __init__(
        self,
        shards: str | Path | Iterable[str | Path],
        *,
        objective: str = "caption",
        modality: str | None = None,
        pair_objective: str | None = None,
        seed: int = 0,
        shuffle: bool = False,
        shuffle_shards: int = 8,
        epochs: int | None = 1,
        rank: int | None = None,
        world_size: int | None = None,
        transform: Callable[[ShardSample], Any] | None = None,
        max_skip_fraction: float | None = 0.1,
        min_samples: int = 20,
        output_media: bool = False,
        path_modality: Mapping[str | Path, str] | Mapping[Path, str] | None = None,
        allow_repeats: bool = False,
        feature_lookup: FeatureLookup | None = None,
        mix: str = "weighted",
        sources: Sequence[Sequence[str | Path]] | None = None,
        source_weights: Sequence[int] | None = None,
        batch_size: int | None = None,
    ):
        """``modality``: of plain (img2dataset) pairs. ``pair_objective``: what pairs become in an
        ``instruct`` stream (default: the objective itself for caption/generate; an instruct stream
        meeting a pair without it is a configuration error). ``rank`` / ``world_size`` override
        ``torch.distributed`` (tests). ``epochs``: passes per iteration, ``None`` for endless.
        ``output_media``: also read the target media of output groups (generate pairs, records'
        ``media_out``) into ``media``, e.g. for a denoising loss; off, they are not read at all.
        ``path_modality``: per-shard modality of plain pairs, overriding ``modality`` (mixtures of
        img2dataset and video2dataset shards). A shard may be listed more than once: a source
        weighted 2 is read twice per pass. ``feature_lookup(shard path, member)``: a cached
        encoder feature of an input media member, or None; a member it has is not read at all
        (its feature goes into ``ShardSample.features``).

        ``mix="balanced"`` (the reference's data mix; needs ``sources``, ``batch_size``): the stream
        yields whole batches (lists of samples), each from one source, the sources taking turns
        (source i ``source_weights[i]`` turns a round); a pass lasts until the largest source is
        used up once, the smaller ones are redrawn (their next reshuffled cycle) meanwhile.
        ``shards`` is then ignored: ``sources`` lists each source's shards once."""
        self.records = RecordReader(
            objective, modality, pair_objective, output_media, path_modality, feature_lookup
        )
        if epochs is not None and epochs < 1:
            raise ValueError(f"epochs must be >= 1 or None (endless), got {epochs}")
        if shuffle_shards < 1:
            raise ValueError(f"shuffle_shards must be >= 1, got {shuffle_shards}")
        self.skips = SkipLedger(max_skip_fraction, min_samples)
        if mix not in MIXES:
            raise ValueError(f"mix must be one of {MIXES}, got {mix!r}")
        self.mix = mix
        source_of: list[int] = []
        if mix == "balanced":
            if not sources or not batch_size or batch_size < 1:
                raise ValueError("mix='balanced' needs sources (shards per source) and a batch_size >= 1")
            per_source = [expand_shards(list(src)) for src in sources]
            source_of = [i for i, src in enumerate(per_source) for _ in src]
            shards = [p for src in per_source for p in src]
            allow_repeats = True
        self.paths = expand_shards(shards, allow_repeats=allow_repeats)
        self.counts = shard_counts(self.paths)
        self.total = sum(self.counts)
        if self.total == 0:
            raise ValueError(f"the {len(self.paths)} shards from {shards!r} hold no samples")
        self.seed, self.shuffle, self.shuffle_shards = int(seed), bool(shuffle), shuffle_shards
        self.epochs, self.transform = epochs, transform
        self.rank, self.world_size = rank, world_size
        self.batch_size = int(batch_size) if batch_size else None
        self.order: WeightedOrder | BalancedOrder
        if self.batch_size is not None and mix == "balanced":
            self.order = BalancedOrder(
                source_of,
                len(per_source),
                self.counts,
                self.seed,
                self.shuffle,
                shuffle_shards,
                source_weights,
                self.batch_size,
            )
        else:
            self.order = WeightedOrder(
                self.counts, self.seed, self.shuffle, shuffle_shards, endless=epochs is None
            )
        self.fingerprint = hashlib.sha1(
            json.dumps(
                [[p.name, n] for p, n in zip(self.paths, self.counts, strict=False)]
                + ([mix, source_of, source_weights, batch_size] if mix == "balanced" else [])
            ).encode()
        ).hexdigest()
        self.progress = StreamProgress()
        self.skips.label = repr(self)

    def __repr__(self) -> str:
        return (
            f"ShardStream({len(self.paths)} shards, {self.total} samples, "
            f"objective={self.records.objective!r}, shuffle={self.shuffle})"
        )

    @property
    def epoch(self) -> int:
        """The pass the next iteration runs (or continues)."""
        return self.progress.epoch

    @epoch.setter
    def epoch(self, epoch: int) -> None:
        self.progress.epoch = epoch

    @property
    def seen(self) -> int:
        return self.skips.seen

    @property
    def skipped(self) -> Counter[str]:
        return self.skips.skipped

    def blocks_per_pass(self, consumers: int) -> int:
        """Balanced mix: batches each consumer yields per pass (every source's turns until the
        largest, per its weight, is used up once)."""
        if not isinstance(self.order, BalancedOrder):
            raise ValueError("blocks_per_pass: a pass has blocks in the balanced mix only (mix='balanced')")
        return self.order.blocks_per_pass(consumers)

    def _rank_world(self) -> tuple[int, int]:
        if self.rank is not None or self.world_size is not None:
            rank, world = int(self.rank or 0), int(self.world_size or 1)
        elif torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        else:
            rank, world = 0, 1
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is outside world_size {world}")
        return rank, world

    # --- iteration ------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[ShardSample | list[ShardSample]]:
        rank, world = self._rank_world()
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        in_worker, topology = info is not None, (world, workers)
        slot, first_epoch, after = self.progress.start(rank, world, worker, workers, self.order, self.epochs)
        end = None if self.epochs is None else self.progress.epoch + self.epochs
        owned = self.order.owned(rank * workers + slot, world * workers, first_epoch, after, end)
        balanced = self.mix == "balanced"
        # open shards: those of the current group (weighted), a few recent ones (balanced)
        shards = OpenShards(self.paths, self.counts, keep=16 if balanced else None)
        watch = PassWatch(self.skips, first_epoch, after, f"rank {rank} (worker {worker})")
        group: tuple[int, int] | None = None
        seen, skipped = 0, Counter[str]()
        last_epoch = None
        batch: list[ShardSample] = []
        try:
            for epoch, gi, g, s, j in owned:
                last_epoch = epoch
                watch.read(epoch)
                if (epoch, gi) != group:
                    if balanced and group is not None:  # a block ends: its batch, even a short or empty one
                        yield batch
                        batch = []
                    shards.new_group()
                    group = (epoch, gi)
                seen += 1
                sample = self._read(shards.get(s), j, skipped, in_worker)
                if sample is None:
                    continue
                sample.position = StreamPosition(
                    epoch, g, rank, slot, world, workers, seen, tuple(sorted(skipped.items())), in_worker
                )
                seen, skipped, watch.delivered = 0, Counter(), True
                self.progress.delivered(rank, slot, epoch, g, topology)
                if balanced:
                    batch.append(sample)
                else:
                    yield sample
            if balanced and group is not None:
                yield batch
        finally:
            shards.close()
        if info is None and self.epochs is not None:
            self.epoch = (last_epoch if last_epoch is not None else self.epoch + self.epochs - 1) + 1

    def _read(
        self, reader: TarSamples, index: int, skipped: Counter[str], in_worker: bool
    ) -> ShardSample | None:
        """The sample, transformed, or None after counting why it was skipped."""
        where = f"{reader.path.name}:?"
        try:
            key, members = reader.sample(index)
            where = f"{reader.path.name}:{key}"
            sample = self.records.parse(reader, key, members)
            if self.transform is not None:
                sample.item = self.transform(sample)
                if sample.item is None:
                    raise SkipSample("rejected by transform")
        except SkipSample as e:
            self.skips.skip(where, e.reason, e.detail, skipped, in_worker)
            return None
        except MediaDecodeError as e:
            self.skips.skip(where, "undecodable media", str(e), skipped, in_worker)
            return None
        if self.skips.unlogged:
            sample.skip_notes = self.skips.take_notes()
        self.skips.count_seen(in_worker)
        return sample

    # --- bad samples and resume -------------------------------------------------------------------
    def record_skip(self, where: str, reason: str, detail: str = "") -> None:
        """Count a sample that failed after the stream handed it over (e.g. decoded later); same counters and limit."""
        self.skips.record_skip(where, reason, detail)

    def set_epoch(self, epoch: int) -> None:
        """Run pass ``epoch`` at the next iteration: from its start, or, when it is already the
        current pass (a resumed one), from where its progress left off."""
        self.progress.set_epoch(epoch)

    def mark_consumed(self, positions: Iterable[StreamPosition | Sequence[Any]]) -> None:
        """Record samples the training step received (in order); from then on only these move the state.
        A worker's skips before each of them are counted, logged and held against the limit here, once
        (the worker only passed them on: it may have read them ahead of a restart that reads them again)."""
        for p in positions:
            p = StreamPosition(*p)
            self.progress.consumed(p)
            if p.in_worker:  # counted in a worker's copy of the stream: bring the counts here
                self.skips.absorb(p)
        self.skips.check()

    def state_dict(self, gather: bool = True) -> StreamState:
        """Everything an exact restart needs; under ``torch.distributed`` (and ``gather``) every rank
        must call it, and each returns all ranks' progress."""
        progress, rotation = dict(self.progress.last), dict(self.progress.rotation)
        skipped, seen = Counter(self.skips.skipped), self.skips.seen
        if (
            gather
            and self.rank is None
            and torch.distributed.is_available()
            and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1
        ):
            rank = torch.distributed.get_rank()
            mine = {**self.progress.of_rank(rank), "skipped": dict(skipped), "seen": seen}
            parts: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(parts, mine)
            progress, rotation, skipped, seen = {}, {}, Counter(), 0
            for part in parts:
                progress.update(part["progress"])
                rotation.update(part["rotation"])
                skipped.update(part["skipped"])
                seen += part["seen"]
        return {
            "version": STATE_VERSION,
            "fingerprint": self.fingerprint,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "shuffle_shards": self.shuffle_shards,
            **self.progress.state(progress, rotation),
            "seen": seen,
            "skipped": dict(skipped),
        }

    def load_state_dict(self, state: StreamState) -> None:
        """Continue where ``state`` left off; refuses a state of other shards, seed or shuffling."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"shard stream state version {state.get('version')!r}, expected {STATE_VERSION}")
        if state["fingerprint"] != self.fingerprint:
            raise ValueError(
                "the saved shard stream state is for other shards (names or sample counts differ):"
                f" {len(self.paths)} shards from {self.paths[0].parent} now"
            )
        for name in ("seed", "shuffle", "shuffle_shards"):
            if state[name] != getattr(self, name):
                raise ValueError(
                    f"the saved shard stream state has {name}={state[name]!r}, this stream {getattr(self, name)!r}"
                )
        self.progress.load(state)
        self.skips.load(state)


class TrackingCollate:
    """Wraps a collate function so each batch carries its samples' positions (``stream_positions``).

    The inner function gets each sample's transform result (``item``), or the ``ShardSample`` itself
    when there is no transform. A dict batch gains the key ``"stream_positions"``; any other result
    becomes ``(batch, positions)``. Hand the positions to :meth:`ShardStream.mark_consumed` when the
    training step gets the batch.
    """

    def __init__(self, collate: Callable[[list[Any]], Any] | None = None):
        self.collate = collate

    def __call__(self, samples: list[ShardSample]) -> Any:
        items = [s.item if s.item is not None else s for s in samples]
        batch = self.collate(items) if self.collate is not None else items
        # a worker's skips travel with the next sample's position, their log lines with them
        positions = [
            s.position._replace(skip_notes=s.skip_notes) if s.skip_notes and s.position else s.position
            for s in samples
        ]
        if isinstance(batch, dict):
            batch["stream_positions"] = positions
            return batch
        return batch, positions
