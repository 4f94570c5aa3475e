"""The order of a shard stream's samples: one global order per pass, and each consumer's share of it.

A consumer is one dataloader worker of one rank; sample ``i`` of a pass's order belongs to consumer
``i % C`` (``C = world_size * num_workers``). :class:`WeightedOrder` is the plain (weighted) order:
shards as given or permuted per pass and taken in shuffled groups; the balanced mix's order is
:class:`datamodules.shards.mix.BalancedOrder`.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from typing import Protocol

import numpy as np

Owned = tuple[int, int, int, int, int]  # (pass, group or block, global index, shard, sample in the shard)


def passes(first_epoch: int, end: int | None) -> Iterable[int]:
    """The passes from ``first_epoch`` on, up to ``end`` (exclusive; ``None``: endless)."""
    return itertools.count(first_epoch) if end is None else range(first_epoch, end)


def group_pairs(counts: Sequence[int], group: Sequence[int]) -> np.ndarray:
    """(shard, sample) rows of every sample of the ``group``'s shards, shard after shard."""
    return np.concatenate([np.stack([np.full(counts[s], s), np.arange(counts[s])], 1) for s in group])


class Order(Protocol):
    def share(self, consumer: int, consumers: int) -> tuple[int, int]:
        """(first global index, stride) of a consumer's samples in a pass."""
        ...

    def pass_length(self, consumers: int) -> int:
        """Global indices in one pass."""
        ...

    def owned(
        self, consumer: int, consumers: int, first_epoch: int, after: int, end: int | None
    ) -> Iterator[Owned]:
        """A consumer's samples after global index ``after`` of ``first_epoch``, up to pass ``end``."""
        ...


class WeightedOrder:
    """Shards in the given order, samples in tar order; with ``shuffle`` the shards are permuted
    (seed, pass) and taken in groups of ``shuffle_shards``, whose (shard, sample) pairs are permuted
    (seed, pass, group). A shard listed twice (a source weighted 2) is read twice per pass."""

    def __init__(self, counts: Sequence[int], seed: int, shuffle: bool, shuffle_shards: int, endless: bool):
        self.counts, self.seed, self.shuffle, self.k, self.endless = (
            counts,
            seed,
            shuffle,
            shuffle_shards,
            endless,
        )
        self.total = sum(counts)

    def groups(self, epoch: int) -> list[list[int]]:
        order = list(range(len(self.counts)))
        if not self.shuffle:
            return [[s] for s in order]
        order = np.random.default_rng([self.seed, epoch]).permutation(len(order)).tolist()
        return [order[i : i + self.k] for i in range(0, len(order), self.k)]

    def group_order(self, epoch: int, gi: int, group: list[int]) -> np.ndarray:
        pairs = group_pairs(self.counts, group)
        if self.shuffle:
            pairs = pairs[np.random.default_rng([self.seed, epoch, gi]).permutation(len(pairs))]
        return pairs

    def share(self, consumer: int, consumers: int) -> tuple[int, int]:
        """``consumer`` of ``consumers``, or, where an endless stream's pass holds fewer samples than
        there are consumers, ``consumer mod total`` of ``total``: every rank and worker gets work (some
        samples repeat within the pass, as a distributed sampler pads), none waits forever for a
        sample it will never own. A finite stream (a cache pass) keeps the exact split: a consumer
        without a sample just ends."""
        if self.total >= consumers or not self.endless:
            return consumer, consumers
        return consumer % self.total, self.total

    def pass_length(self, consumers: int) -> int:
        return self.total

    def owned(
        self, consumer: int, consumers: int, first_epoch: int, after: int, end: int | None
    ) -> Iterator[Owned]:
        consumer, consumers = self.share(consumer, consumers)
        for epoch in passes(first_epoch, end):
            start = after + 1 if epoch == first_epoch else 0
            offset = 0
            for gi, group in enumerate(self.groups(epoch)):
                size = sum(self.counts[s] for s in group)
                lo = max(offset, start)
                first = lo + (consumer - lo) % consumers
                if first < offset + size:
                    order = self.group_order(epoch, gi, group)
                    for g in range(first, offset + size, consumers):
                        s, j = order[g - offset]
                        yield epoch, gi, g, int(s), int(j)
                offset += size
