"""The balanced mix (the reference's data mix): whole batches, each from one source, the sources
taking turns by weight; a pass lasts until the largest source is used up once, the smaller ones
redrawn (their next reshuffled cycle) meanwhile."""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterator, Sequence

import numpy as np

from datamodules.shards.order import Owned, group_pairs, passes


class SourceCycles:
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
        self._starts: list[int] = []
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
            pairs = group_pairs(self.counts, group)
            if self.shuffle:
                pairs = pairs[
                    np.random.default_rng([self.seed, 7919, self.source, cycle, gi]).permutation(len(pairs))
                ]
            self._cached = (lo, pairs)
        shard, sample = self._cached[1][r - lo]
        return int(shard), int(sample)


class BalancedOrder:
    """Block ``t`` of a pass is ``consumers x batch_size`` consecutive samples of source
    ``rotation[t % len(rotation)]`` (source i takes ``weights[i]`` turns a round); sample ``u`` of a
    block goes to consumer ``u % consumers``, so each consumer's share of a block is one batch of one
    source. A source's samples run on across blocks and passes through its own reshuffled cycles."""

    def __init__(
        self,
        source_of: Sequence[int],
        sources: int,
        counts: Sequence[int],
        seed: int,
        shuffle: bool,
        shuffle_shards: int,
        weights: Sequence[int] | None,
        batch_size: int,
    ):
        """``source_of``: the source of each shard (of ``counts``); ``sources``: how many there are."""
        turns = [int(w) for w in (weights or [1] * sources)]
        if len(turns) != sources or min(turns) < 1:
            raise ValueError(f"source_weights must be one positive integer per source, got {turns}")
        self.batch_size = batch_size
        self.rotation = [i for i, w in enumerate(turns) for _ in range(w)]
        self.orders = [
            SourceCycles(
                [k for k, src in enumerate(source_of) if src == i], counts, seed, shuffle, shuffle_shards, i
            )
            for i in range(sources)
        ]
        empty = [i for i, o in enumerate(self.orders) if not o.size]
        if empty:
            raise ValueError(f"balanced mix: source(s) {empty} hold no samples")

    def blocks_per_pass(self, consumers: int) -> int:
        """Batches each consumer yields per pass (every source's turns until the largest, per its
        weight, is used up once)."""
        per_block = consumers * self.batch_size
        rounds = max(
            math.ceil(o.size / (self.rotation.count(i) * per_block)) for i, o in enumerate(self.orders)
        )
        return rounds * len(self.rotation)

    def share(self, consumer: int, consumers: int) -> tuple[int, int]:
        return consumer, consumers

    def pass_length(self, consumers: int) -> int:
        return self.blocks_per_pass(consumers) * consumers * self.batch_size

    def owned(
        self, consumer: int, consumers: int, first_epoch: int, after: int, end: int | None
    ) -> Iterator[Owned]:
        """(pass, block, global index, shard, sample) of one consumer's samples, block by block."""
        per_block, blocks = consumers * self.batch_size, self.blocks_per_pass(consumers)
        rounds = len(self.rotation)
        turns = [self.rotation[: t % rounds].count(self.rotation[t % rounds]) for t in range(blocks)]
        per_round = {i: self.rotation.count(i) for i in set(self.rotation)}
        for epoch in passes(first_epoch, end):
            start = after + 1 if epoch == first_epoch else 0
            for t in range(blocks):
                src = self.rotation[t % rounds]
                earlier = (t // rounds) * per_round[src] + turns[t]  # blocks of src before t in this pass
                base = (epoch * (blocks // rounds) * per_round[src] + earlier) * per_block
                for i in range(self.batch_size):
                    u = consumer + consumers * i
                    g = t * per_block + u
                    if g >= start:
                        shard, sample = self.orders[src].at(base + u)
                        yield epoch, t, g, shard, sample
