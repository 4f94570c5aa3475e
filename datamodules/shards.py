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
:class:`~nextgpt.encoders.preprocess.MediaDecodeError` and :class:`SkipSample` raised by it count
as skips too. Code that decodes elsewhere calls :meth:`ShardStream.record_skip`. Past
``min_samples`` seen, a skipped fraction above ``max_skip_fraction`` raises :class:`TooManySkipped`.
A skip is counted, logged and held against the limit once, where the sample is handed over: read in
this process, as it is read; read by a dataloader worker, when the training side receives the next
sample (:meth:`ShardStream.mark_consumed`). Workers read ahead, and what they read but the trainer
never received is read again by the next epoch's workers: counted in the worker, it was counted
(and warned about) twice, and the limit checked on read-ahead (4 of 33 for 1 bad sample in 11).
"""

from __future__ import annotations

import bisect
import glob
import hashlib
import itertools
import json
import logging
import math
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from datamodules.nextgpt_layout import OBJECTIVES, Skip, _pairs_caption, _pairs_generate
from datamodules.prepare import INDEX_SUFFIX
from nextgpt import modality as modality_registry
from nextgpt.encoders.preprocess import MediaDecodeError
from nextgpt.prompts import Conversation
from nextgpt.runs import RunError

log = logging.getLogger(__name__)

STATE_VERSION = 1
MIXES = ("weighted", "balanced")
PAIR_OBJECTIVES = ("caption", "generate")
_HAS_MEDIA_OUT = "media_out" in {f.name for f in fields(Conversation)}


def _conversation(
    key: str,
    turns: list[tuple[str, str]],
    media_in: list[tuple[str, str]],
    captions_out: list[tuple[str, str]],
    media_out: list[tuple[str, str]],
    kind: str = "",
) -> Conversation:
    """A Conversation with output media members where the dataclass has that field."""
    extra = {"media_out": media_out} if _HAS_MEDIA_OUT and media_out else {}
    return Conversation(key, turns, media_in=media_in, captions_out=captions_out, kind=kind, **extra)


class SkipSample(Exception):
    """A sample that can not be used: ``reason`` is the counter key, ``detail`` goes to the log."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason, self.detail = reason, detail
        super().__init__(f"{reason} ({detail})" if detail else reason)


class TooManySkipped(RunError):
    """More bad samples than ``max_skip_fraction`` allows: likely a broken conversion, not bad luck."""


class StreamPosition(NamedTuple):
    """Where one yielded sample sits; a NamedTuple so collate, pin_memory and Lightning pass it through."""

    epoch: int  # pass number
    index: int  # index in that pass's global order
    rank: int
    slot: int  # consumer slot within the rank (the worker id, rotated on resume)
    world_size: int
    num_workers: int  # 1 without dataloader workers
    seen: int = 1  # raw samples this consumer read since its previous yield, this one included
    skipped: tuple[tuple[str, int], ...] = ()  # and how many of those it skipped, by reason
    in_worker: bool = False
    skip_notes: tuple[str, ...] = ()  # the log lines of those skips (a worker's, logged by mark_consumed)


@dataclass
class ShardSample:
    """One good sample. ``conversation.media_in`` paths are member names, keys of ``media``."""

    conversation: Conversation
    media: dict[str, bytes]  # the input media members, undecoded
    shard: str  # shard file name
    key: str  # the sample's key in the tar
    source: str | None = None  # the record's "source" (shard set name), when written by prepare
    position: StreamPosition | None = None
    item: Any = None  # what the stream's transform made of it
    features: dict[str, np.ndarray] = field(
        default_factory=dict
    )  # cached encoder features of members not read
    skip_notes: tuple[str, ...] = ()  # a worker's skips before this sample, not yet logged (TrackingCollate)

    @property
    def where(self) -> str:
        return f"{self.shard}:{self.key}"


# ------------------------------------------------------------------------------------------------
# shard lists and counts
# ------------------------------------------------------------------------------------------------
def expand_shards(spec: str | Path | Iterable[str | Path], *, allow_repeats: bool = False) -> list[Path]:
    """Shard files from a folder (its ``*.tar``, sorted), a brace pattern, a glob, a file, or a list of these.

    A shard listed twice is an error (its samples would be read twice per pass) unless
    ``allow_repeats``: weighted mixtures repeat a source's shards on purpose."""
    import braceexpand

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


def _split_name(name: str) -> tuple[str | None, str | None]:
    """WebDataset's rule: the key is everything before the first dot of the base name."""
    from webdataset.tariterators import base_plus_ext

    return base_plus_ext(name)


def _scan(tar: tarfile.TarFile) -> list[tuple[str, dict[str, tarfile.TarInfo]]]:
    """Samples as runs of consecutive members sharing a key (as WebDataset groups them)."""
    samples: list[tuple[str, dict[str, tarfile.TarInfo]]] = []
    for info in tar:
        if not info.isreg():
            continue
        key, ext = _split_name(info.name)
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


class _TarSamples:
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

    def sample(self, i: int) -> tuple[str, dict[str, tarfile.TarInfo]]:
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


# ------------------------------------------------------------------------------------------------
# records -> conversations
# ------------------------------------------------------------------------------------------------
def _pairs_of_str(value: Any, what: str) -> list[tuple[str, str]]:
    if not isinstance(value, list) or not all(
        isinstance(v, list) and len(v) == 2 and all(isinstance(x, str) for x in v) for v in value
    ):
        raise SkipSample("wrong JSON type", f"{what} is not a list of [str, str]")
    return [(a, b) for a, b in value]


def _modality(name: str) -> Any:
    try:
        return modality_registry.get(name)
    except KeyError:
        raise SkipSample("unknown modality", name) from None


def _placeholder_counts(texts: Iterable[str]) -> Counter:
    counts: Counter = Counter()
    for t in texts:
        for name in modality_registry.names():
            counts[name] += t.count(modality_registry.get(name).placeholder)
    return +counts


# ------------------------------------------------------------------------------------------------
# the stream
# ------------------------------------------------------------------------------------------------
class _SourceOrder:
    """One source's samples, cycle after cycle, each cycle reshuffled (seed, source, cycle): shard
    groups of ``shuffle_shards`` in a permuted order, (shard, sample) pairs permuted within a group,
    as the weighted stream orders a pass. ``at(j)`` is the j-th sample over all cycles."""

    def __init__(
        self,
        paths: list[int],
        counts: Sequence[int],
        seed: int,
        shuffle: bool,
        shuffle_shards: int,
        source: int,
    ):
        self.paths, self.counts, self.seed, self.shuffle, self.k, self.source = (
            paths,
            counts,
            seed,
            shuffle,
            shuffle_shards,
            source,
        )
        self.size = sum(counts[p] for p in paths)
        self._cycle: int | None = None
        self._groups: list[
            tuple[int, int, list[int]]
        ] = []  # (start, end, shard indices) of the current cycle
        self._cached: tuple[int, np.ndarray] | None = None  # (group start, its permuted pairs)

    def _layout(self, cycle: int) -> None:
        order = list(self.paths)
        if self.shuffle:
            order = [
                self.paths[i]
                for i in np.random.default_rng([self.seed, 7919, self.source, cycle]).permutation(len(order))
            ]
        groups = (
            [order[i : i + self.k] for i in range(0, len(order), self.k)]
            if self.shuffle
            else [[p] for p in order]
        )
        self._groups, start = [], 0
        for group in groups:
            size = sum(self.counts[p] for p in group)
            self._groups.append((start, start + size, group))
            start += size
        self._starts = [lo for lo, _, _ in self._groups]
        self._cycle, self._cached = cycle, None

    def at(self, j: int) -> tuple[int, int]:
        cycle, r = divmod(j, self.size)
        if cycle != self._cycle:
            self._layout(cycle)
        gi = bisect.bisect_right(self._starts, r) - 1
        lo, _, group = self._groups[gi]
        if self._cached is None or self._cached[0] != lo:
            pairs = np.concatenate(
                [np.stack([np.full(self.counts[p], p), np.arange(self.counts[p])], 1) for p in group]
            )
            if self.shuffle:
                pairs = pairs[
                    np.random.default_rng([self.seed, 7919, self.source, cycle, gi]).permutation(len(pairs))
                ]
            self._cached = (lo, pairs)
        shard, sample = self._cached[1][r - lo]
        return int(shard), int(sample)


class ShardStream(IterableDataset):
    """Samples of WebDataset shards, split exactly over ranks and workers; see the module docstring."""

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
        path_modality: Mapping[str | Path, str] | None = None,
        allow_repeats: bool = False,
        feature_lookup: Callable[[Path, str], np.ndarray | None] | None = None,
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
        if objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {objective!r}; known: {list(OBJECTIVES)}")
        if pair_objective is not None and pair_objective not in PAIR_OBJECTIVES:
            raise ValueError(f"pair_objective must be one of {PAIR_OBJECTIVES}, got {pair_objective!r}")
        if modality is not None:
            modality_registry.get(modality)
        if epochs is not None and epochs < 1:
            raise ValueError(f"epochs must be >= 1 or None (endless), got {epochs}")
        if shuffle_shards < 1:
            raise ValueError(f"shuffle_shards must be >= 1, got {shuffle_shards}")
        if max_skip_fraction is not None and not 0.0 <= max_skip_fraction <= 1.0:
            raise ValueError(f"max_skip_fraction must be in [0, 1] or None, got {max_skip_fraction}")
        if mix not in MIXES:
            raise ValueError(f"mix must be one of {MIXES}, got {mix!r}")
        self.mix = mix
        if mix == "balanced":
            if not sources or not batch_size or batch_size < 1:
                raise ValueError("mix='balanced' needs sources (shards per source) and a batch_size >= 1")
            per_source = [expand_shards(list(src)) for src in sources]
            self.source_of = [i for i, src in enumerate(per_source) for _ in src]
            shards = [p for src in per_source for p in src]
            allow_repeats = True
        self.paths = expand_shards(shards, allow_repeats=allow_repeats)
        self.counts = shard_counts(self.paths)
        self.total = sum(self.counts)
        if self.total == 0:
            raise ValueError(f"the {len(self.paths)} shards from {shards!r} hold no samples")
        self.objective, self.modality, self.seed, self.shuffle = objective, modality, int(seed), bool(shuffle)
        self.pair_objective = pair_objective or (objective if objective in PAIR_OBJECTIVES else None)
        self.shuffle_shards, self.epochs, self.transform = shuffle_shards, epochs, transform
        self.rank, self.world_size = rank, world_size
        self.max_skip_fraction, self.min_samples = max_skip_fraction, min_samples
        self.output_media = bool(output_media)
        self.feature_lookup = feature_lookup
        self.batch_size = int(batch_size) if batch_size else None
        if mix == "balanced":
            weights = [int(w) for w in (source_weights or [1] * len(per_source))]
            if len(weights) != len(per_source) or min(weights) < 1:
                raise ValueError(f"source_weights must be one positive integer per source, got {weights}")
            self.rotation = [i for i, w in enumerate(weights) for _ in range(w)]
            self.orders = [
                _SourceOrder(
                    [k for k, src in enumerate(self.source_of) if src == i],
                    self.counts,
                    self.seed,
                    self.shuffle,
                    self.shuffle_shards,
                    i,
                )
                for i in range(len(per_source))
            ]
            empty = [i for i, o in enumerate(self.orders) if not o.size]
            if empty:
                raise ValueError(f"balanced mix: source(s) {empty} hold no samples")
        self.path_modality = {Path(k): v for k, v in (path_modality or {}).items()}
        for name in self.path_modality.values():
            modality_registry.get(name)
        self.fingerprint = hashlib.sha1(
            json.dumps(
                [[p.name, n] for p, n in zip(self.paths, self.counts, strict=False)]
                + ([mix, self.source_of, source_weights, batch_size] if mix == "balanced" else [])
            ).encode()
        ).hexdigest()
        self.epoch = 0
        self.seen = 0
        self.skipped: Counter = Counter()
        self._progress: dict[tuple[int, int], tuple[int, int]] = {}  # (rank, slot) -> (pass, last index)
        self._rotation: dict[int, int] = {}  # rank -> slot that delivers the next batch
        self._topology: tuple[int, int] | None = None  # (world_size, num_workers) the progress is for
        self._tracked = False  # mark_consumed was called: yields no longer move the progress
        self._unlogged: list[str] = []  # in a worker: skips since the last good sample, logged when consumed

    def __repr__(self) -> str:
        return (
            f"ShardStream({len(self.paths)} shards, {self.total} samples, "
            f"objective={self.objective!r}, shuffle={self.shuffle})"
        )

    # --- order -------------------------------------------------------------------------------
    def _groups(self, epoch: int) -> list[list[int]]:
        order = list(range(len(self.paths)))
        if not self.shuffle:
            return [[s] for s in order]
        order = np.random.default_rng([self.seed, epoch]).permutation(len(order)).tolist()
        k = self.shuffle_shards
        return [order[i : i + k] for i in range(0, len(order), k)]

    def _group_order(self, epoch: int, gi: int, group: list[int]) -> np.ndarray:
        pairs = np.concatenate(
            [np.stack([np.full(self.counts[s], s), np.arange(self.counts[s])], 1) for s in group]
        )
        if self.shuffle:
            pairs = pairs[np.random.default_rng([self.seed, epoch, gi]).permutation(len(pairs))]
        return pairs

    def _share(self, consumer: int, consumers: int) -> tuple[int, int]:
        """(first index, stride) of a consumer's samples in a pass: ``consumer`` of ``consumers``, or,
        where an endless stream's pass holds fewer samples than there are consumers, ``consumer mod
        total`` of ``total``: every rank and worker gets work (some samples repeat within the pass, as a
        distributed sampler pads), none waits forever for a sample it will never own. A finite
        stream (a cache pass) keeps the exact split: a consumer without a sample just ends."""
        if self.total >= consumers or self.epochs is not None:
            return consumer, consumers
        return consumer % self.total, self.total

    def _owned(
        self, consumer: int, consumers: int, first_epoch: int, after: int
    ) -> Iterator[tuple[int, int, int, int, int]]:
        """(pass, group, global index, shard, sample) of one consumer's samples, after ``after`` in ``first_epoch``."""
        consumer, consumers = self._share(consumer, consumers)
        passes = (
            itertools.count(first_epoch)
            if self.epochs is None
            else range(first_epoch, self.epoch + self.epochs)
        )
        for epoch in passes:
            start = after + 1 if epoch == first_epoch else 0
            offset = 0
            for gi, group in enumerate(self._groups(epoch)):
                size = sum(self.counts[s] for s in group)
                lo = max(offset, start)
                first = lo + (consumer - lo) % consumers
                if first < offset + size:
                    order = self._group_order(epoch, gi, group)
                    for g in range(first, offset + size, consumers):
                        s, j = order[g - offset]
                        yield epoch, gi, g, int(s), int(j)
                offset += size

    def blocks_per_pass(self, consumers: int) -> int:
        """Balanced mix: batches each consumer yields per pass (every source's turns until the
        largest, per its weight, is used up once)."""
        per_block = consumers * self.batch_size
        rounds = max(
            math.ceil(o.size / (self.rotation.count(i) * per_block)) for i, o in enumerate(self.orders)
        )
        return rounds * len(self.rotation)

    def _owned_balanced(
        self, consumer: int, consumers: int, first_epoch: int, after: int
    ) -> Iterator[tuple[int, int, int, int, int]]:
        """(pass, block, global index, shard, sample) of one consumer's samples, block by block.

        Block t of a pass is ``consumers x batch_size`` consecutive samples of source
        ``rotation[t % len(rotation)]``; sample ``u`` of a block goes to consumer ``u % consumers``,
        so each consumer's share of a block is one batch of one source. A source's samples run on
        across blocks and passes through its own reshuffled cycles."""
        per_block, blocks = consumers * self.batch_size, self.blocks_per_pass(consumers)
        turns = [
            self.rotation[: t % len(self.rotation)].count(self.rotation[t % len(self.rotation)])
            for t in range(blocks)
        ]
        per_round = {i: self.rotation.count(i) for i in set(self.rotation)}
        passes = (
            itertools.count(first_epoch)
            if self.epochs is None
            else range(first_epoch, self.epoch + self.epochs)
        )
        for epoch in passes:
            start = after + 1 if epoch == first_epoch else 0
            for t in range(blocks):
                src = self.rotation[t % len(self.rotation)]
                earlier = (t // len(self.rotation)) * per_round[src] + turns[
                    t
                ]  # blocks of src before t in this pass
                base = (epoch * (blocks // len(self.rotation)) * per_round[src] + earlier) * per_block
                for i in range(self.batch_size):
                    u = consumer + consumers * i
                    g = t * per_block + u
                    if g >= start:
                        shard, sample = self.orders[src].at(base + u)
                        yield epoch, t, g, shard, sample

    def _pass_length(self, consumers: int) -> int:
        return (
            self.blocks_per_pass(consumers) * consumers * self.batch_size
            if self.mix == "balanced"
            else self.total
        )

    # --- topology -----------------------------------------------------------------------------
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

    def _finished(self, epoch: int, rank: int, world: int, workers: int) -> bool:
        """This rank's consumers have handed over every sample of pass ``epoch`` (a resumed end of pass)."""
        consumers = world * workers
        for slot in range(workers):
            c, stride = (
                (rank * workers + slot, consumers)
                if self.mix == "balanced"
                else self._share(rank * workers + slot, consumers)
            )
            e, last = self._progress.get((rank, slot), (epoch - 1, -1))
            nxt = c if e < epoch else last + stride
            if e <= epoch and nxt < self._pass_length(consumers):
                return False
        return True

    # --- iteration ------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[ShardSample]:
        rank, world = self._rank_world()
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        topology = (world, workers)
        if self._progress and self._topology not in (None, topology):
            raise ValueError(
                f"this stream's state was saved with world_size={self._topology[0]} x num_workers={self._topology[1]};"
                f" it is now {world} x {workers}: exact resume needs the same ranks and dataloader workers"
            )
        resumed = bool(self._progress)
        slot = (worker + self._rotation.get(rank, 0)) % workers if resumed else worker
        if (
            self.epochs is not None
            and resumed
            and self._finished(self.epoch + self.epochs - 1, rank, world, workers)
        ):
            self.epoch += self.epochs  # restarted exactly at the end of its passes: run the next ones
        first_epoch, after = self.epoch, -1
        e, last = self._progress.get((rank, slot), (self.epoch - 1, -1))
        if e >= self.epoch:
            first_epoch, after = e, last
        consumer, consumers = rank * workers + slot, world * workers
        balanced = self.mix == "balanced"
        owned = (self._owned_balanced if balanced else self._owned)(consumer, consumers, first_epoch, after)
        readers: dict[
            int, _TarSamples
        ] = {}  # open shards: those of the current group (weighted), a few recent (balanced)
        group = None
        seen, skipped = 0, Counter()
        last_epoch = None
        batch: list[ShardSample] = []
        in_pass, delivered, tried = None, False, 0  # this consumer's current pass, whether it gave a sample
        try:
            for epoch, gi, g, s, j in owned:
                last_epoch = epoch
                if epoch != in_pass:
                    if in_pass is not None and not delivered and (in_pass != first_epoch or after < 0):
                        for line in self._unlogged[
                            :20
                        ]:  # a worker's: no sample will carry them to the trainer
                            log.warning("skipped %s", line)
                        raise TooManySkipped(
                            f"no usable sample in a whole pass: all {tried} samples that rank {rank} (worker {worker}) "
                            f"reads from {self!r} were skipped; by reason: {dict(self.skipped)}. Check the shards "
                            "(python -m datamodules.prepare) and their source"
                        )
                    in_pass, delivered, tried = epoch, False, 0
                tried += 1
                if (epoch, gi) != group:
                    if balanced and group is not None:  # a block ends: its batch, even a short or empty one
                        yield batch
                        batch = []
                    if not balanced or len(readers) > 16:
                        for r in readers.values():
                            r.close()
                        readers = {}
                    group = (epoch, gi)
                if s not in readers:
                    readers[s] = _TarSamples(self.paths[s], self.counts[s])
                seen += 1
                sample = self._read(readers[s], j, skipped)
                if sample is None:
                    continue
                sample.position = StreamPosition(
                    epoch,
                    g,
                    rank,
                    slot,
                    world,
                    workers,
                    seen,
                    tuple(sorted(skipped.items())),
                    info is not None,
                )
                seen, skipped, delivered = 0, Counter(), True
                if not self._tracked:
                    self._progress[(rank, slot)] = (epoch, g)
                    self._topology = topology
                if balanced:
                    batch.append(sample)
                else:
                    yield sample
            if balanced and group is not None:
                yield batch
        finally:
            for r in readers.values():
                r.close()
        if info is None and self.epochs is not None:
            self.epoch = (last_epoch if last_epoch is not None else self.epoch + self.epochs - 1) + 1

    def _read(self, reader: _TarSamples, index: int, skipped: Counter) -> ShardSample | None:
        """The sample, transformed, or None after counting why it was skipped."""
        key, where = "?", f"{reader.path.name}:?"
        try:
            key, members = reader.sample(index)
            where = f"{reader.path.name}:{key}"
            sample = self._parse(reader, key, members)
            if self.transform is not None:
                sample.item = self.transform(sample)
                if sample.item is None:
                    raise SkipSample("rejected by transform")
        except SkipSample as e:
            self._skip(where, e.reason, e.detail, skipped)
            return None
        except MediaDecodeError as e:
            self._skip(where, "undecodable media", str(e), skipped)
            return None
        if self._unlogged:
            sample.skip_notes, self._unlogged = tuple(self._unlogged), []
        self._count_seen()
        return sample

    # --- parsing --------------------------------------------------------------------------------
    def _parse(self, reader: _TarSamples, key: str, members: dict[str, tarfile.TarInfo]) -> ShardSample:
        shard = reader.path.name
        obj: Any = None
        if "json" in members:
            try:
                obj = json.loads(reader.read(members["json"]))
            except (ValueError, UnicodeDecodeError) as e:
                raise SkipSample("unreadable JSON", str(e)) from None
            if isinstance(obj, dict) and "kind" in obj:
                return self._record(reader, key, members, obj)
            if not isinstance(obj, dict):
                raise SkipSample("wrong JSON type", f"the .json member holds a {type(obj).__name__}")
        # a plain pair, as img2dataset / video2dataset write them: caption in .txt (or the json's "caption")
        if "txt" in members:
            try:
                caption: Any = reader.read(members["txt"]).decode("utf-8")
            except UnicodeDecodeError as e:
                raise SkipSample("unreadable caption", str(e)) from None
        else:
            caption = obj.get("caption") if obj is not None else None
        modality = self.path_modality.get(reader.path, self.modality)
        if modality is None:
            raise ValueError(
                f"{shard}:{key} is a plain text-X pair (no prepare record): give the stream modality="
            )
        mod = modality_registry.get(modality)
        media = [ext for ext in members if "." + ext.rsplit(".", 1)[-1] in mod.extensions]
        return self._pair(reader, key, members, caption, mod.name, media[0] if media else None, None, key)

    def _record(
        self, reader: _TarSamples, key: str, members: dict[str, tarfile.TarInfo], obj: dict
    ) -> ShardSample:
        kind, source = obj["kind"], obj.get("source") if isinstance(obj.get("source"), str) else None
        conv_key = obj["key"] if isinstance(obj.get("key"), str) and obj["key"] else key
        if kind == "pair":
            media = obj.get("media")
            if not (isinstance(media, list) and len(media) == 2 and all(isinstance(x, str) for x in media)):
                raise SkipSample("wrong JSON type", "media is not [modality, member extension]")
            return self._pair(
                reader,
                key,
                members,
                obj.get("caption"),
                _modality(media[0]).name,
                media[1].lower(),
                source,
                conv_key,
            )
        if kind != "conversation":
            raise SkipSample("unknown record kind", repr(kind))
        turns = _pairs_of_str(obj.get("turns"), "turns")
        media_in = _pairs_of_str(obj.get("media_in", []), "media_in")
        captions_out = _pairs_of_str(obj.get("captions_out", []), "captions_out")
        if not turns:
            raise SkipSample("wrong JSON type", "turns is empty")
        for name, caption in captions_out:
            _modality(name)
            if not caption.strip():
                raise SkipSample("empty caption", f"{name} output caption")
        want_in = _placeholder_counts(h for h, _ in turns)
        want_out = _placeholder_counts(a for _, a in turns)
        if want_in != Counter(_modality(m).name for m, _ in media_in) or want_out != Counter(
            m for m, _ in captions_out
        ):
            raise SkipSample("placeholder mismatch", f"placeholders in {dict(want_in)} out {dict(want_out)}")
        media_out = _pairs_of_str(obj.get("media_out", []), "media_out") if self.output_media else []
        data, features = {}, {}
        for (_, ext), is_input in [*((m, True) for m in media_in), *((m, False) for m in media_out)]:
            if ext.lower() not in members:
                raise SkipSample("missing media member", f"{key}.{ext}")
            member = f"{key}.{ext.lower()}"
            cached = self._cached(reader, member) if is_input else None
            if cached is not None:
                features[member] = cached
            else:
                data[member] = reader.read(members[ext.lower()])
        conv = _conversation(
            conv_key,
            turns,
            [(m, f"{key}.{e.lower()}") for m, e in media_in],
            captions_out,
            [(m, f"{key}.{e.lower()}") for m, e in media_out],
        )
        return ShardSample(conv, data, reader.path.name, key, source, features=features)

    def _pair(
        self,
        reader: _TarSamples,
        key: str,
        members: dict[str, tarfile.TarInfo],
        caption: Any,
        modality: str,
        ext: str | None,
        source: str | None,
        conv_key: str,
    ) -> ShardSample:
        if caption is None:
            raise SkipSample("missing caption")
        if not isinstance(caption, str):
            raise SkipSample("wrong JSON type", f"caption is a {type(caption).__name__}")
        if not caption.strip():
            raise SkipSample("empty caption")
        if self.pair_objective is None:
            raise ValueError(
                f"{reader.path.name}:{key} is a text-X pair in an {self.objective!r} stream:"
                f" set pair_objective to one of {PAIR_OBJECTIVES} or leave pair shards out"
            )
        mod = modality_registry.get(modality)
        member = f"{key}.{ext}" if ext else f"{key}.?"
        entry = {"id": conv_key, mod.name_field: member, "caption": caption}
        generate = self.pair_objective == "generate"
        try:
            # root None: the name is a tar member, not a file under a data root
            conv = (_pairs_generate if generate else _pairs_caption)(entry, mod, None, 0)
        except Skip as e:
            raise SkipSample(str(e)) from None
        if generate and not self.output_media:  # text -> X: the media is not needed
            return ShardSample(
                _conversation(conv.key, conv.turns, [], conv.captions_out, [], conv.kind),
                {},
                reader.path.name,
                key,
                source,
            )
        if ext is None or ext not in members:
            raise SkipSample("missing media member", f"no {modality} member" if ext is None else member)
        media = [(modality, member)]
        conv = _conversation(
            conv.key,
            conv.turns,
            [] if generate else media,
            conv.captions_out,
            media if generate else [],
            conv.kind,
        )
        cached = None if generate else self._cached(reader, member)
        if cached is not None:  # its feature is cached: the member is never read
            return ShardSample(conv, {}, reader.path.name, key, source, features={member: cached})
        return ShardSample(conv, {member: reader.read(members[ext])}, reader.path.name, key, source)

    def _cached(self, reader: _TarSamples, member: str) -> np.ndarray | None:
        return self.feature_lookup(reader.path, member) if self.feature_lookup is not None else None

    # --- bad samples --------------------------------------------------------------------------
    def _count_seen(self) -> None:
        self.seen += 1
        if get_worker_info() is None:  # a worker's copy also counts read-ahead: checked in mark_consumed
            self._check()

    def _skip(self, where: str, reason: str, detail: str, pending: Counter | None = None) -> None:
        self.skipped[reason] += 1
        if pending is not None:
            pending[reason] += 1
        line = f"{where}: {reason}" + (f" ({detail})" if detail else "")
        if get_worker_info() is None:
            log.warning("skipped %s", line)
        else:  # logged once, by mark_consumed, if and when the trainer receives the next sample
            self._unlogged.append(line)
        self._count_seen()

    def record_skip(self, where: str, reason: str, detail: str = "") -> None:
        """Count a sample that failed after the stream handed it over (e.g. decoded later); same counters and limit."""
        self.skipped[reason] += 1
        log.warning("skipped %s: %s%s", where, reason, f" ({detail})" if detail else "")
        self._check()

    def _check(self) -> None:
        bad = sum(self.skipped.values())
        if (
            self.max_skip_fraction is None
            or self.seen < self.min_samples
            or bad <= self.max_skip_fraction * self.seen
        ):
            return
        raise TooManySkipped(
            f"{bad} of {self.seen} samples skipped ({bad / self.seen:.1%} > max_skip_fraction "
            f"{self.max_skip_fraction:.1%}) in {self!r}; by reason: {dict(self.skipped)}. "
            "Check the shards (python -m datamodules.prepare) or raise max_skip_fraction."
        )

    # --- resume ---------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Run pass ``epoch`` at the next iteration: from its start, or, when it is already the
        current pass (a resumed one), from where its progress left off."""
        if int(epoch) != self.epoch:
            self._progress, self._rotation, self._topology = {}, {}, None
        self.epoch = int(epoch)

    def mark_consumed(self, positions: Iterable[StreamPosition | Sequence[Any]]) -> None:
        """Record samples the training step received (in order); from then on only these move the state.
        A worker's skips before each of them are counted, logged and held against the limit here, once
        (the worker only passed them on: it may have read them ahead of a restart that reads them again)."""
        for p in positions:
            p = StreamPosition(*p)
            self._tracked = True
            self._progress[(p.rank, p.slot)] = (p.epoch, p.index)
            self._rotation[p.rank] = (p.slot + 1) % p.num_workers
            self._topology = (p.world_size, p.num_workers)
            if p.in_worker:  # counted in a worker's copy of the stream: bring the counts here
                self.seen += p.seen
                self.skipped.update(dict(p.skipped))
                for line in p.skip_notes:
                    log.warning("skipped %s", line)
        self._check()

    def state_dict(self, gather: bool = True) -> dict[str, Any]:
        """Everything an exact restart needs; under ``torch.distributed`` (and ``gather``) every rank
        must call it, and each returns all ranks' progress."""
        progress = dict(self._progress)
        rotation = dict(self._rotation)
        skipped, seen = Counter(self.skipped), self.seen
        if (
            gather
            and self.rank is None
            and torch.distributed.is_available()
            and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1
        ):
            rank = torch.distributed.get_rank()
            mine = {
                "progress": {k: v for k, v in progress.items() if k[0] == rank},
                "rotation": {rank: rotation[rank]} if rank in rotation else {},
                "topology": self._topology,
                "skipped": dict(skipped),
                "seen": seen,
            }
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
            "epoch": self.epoch,
            "topology": list(self._topology) if self._topology else None,
            "progress": {f"{r}:{s}": [e, i] for (r, s), (e, i) in sorted(progress.items())},
            "rotation": {str(r): v for r, v in rotation.items()},
            "seen": seen,
            "skipped": dict(skipped),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
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
        self.epoch = int(state["epoch"])
        self._topology = tuple(state["topology"]) if state["topology"] else None
        self._progress = {
            tuple(int(x) for x in k.split(":")): (int(v[0]), int(v[1])) for k, v in state["progress"].items()
        }
        self._rotation = {int(r): int(v) for r, v in state["rotation"].items()}
        self.seen, self.skipped = int(state["seen"]), Counter(state["skipped"])
        self._tracked = False


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
            s.position._replace(skip_notes=s.skip_notes) if s.skip_notes else s.position for s in samples
        ]
        if isinstance(batch, dict):
            batch["stream_positions"] = positions
            return batch
        return batch, positions
