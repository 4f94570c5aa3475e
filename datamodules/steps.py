"""Batches grouped by optimizer step, equal on every rank, resumable mid-epoch.

Three rules hold for every training loader, so that many processes train exactly as one:

- **Windows.** :class:`StepWindows` reads the micro-batches of one optimizer step (the
  ``accumulate_grad_batches`` of them) before handing out the first, sums their ``counts``
  (label tokens, output groups) and attaches that sum to each as ``batch["window"]``. The stage
  adds up the ranks' sums with one all-reduce, so every loss term is normalised over the step's
  global batch, not per rank or per micro-batch. The window holds its micro-batches in host
  memory until they are used: ``accumulate_grad_batches`` batches at most.
- **Equal counts.** Every rank yields the same number of batches per epoch (the sampler pads, the
  shard path caps), so no rank waits in a collective for a rank that has run out of data.
- **Resume.** The data modules count the batches the training step received (in
  ``on_before_batch_transfer``, so batches prefetched but not used do not count) and save the count
  in Lightning's checkpoints; a run restarted from one skips exactly those batches (the sampler
  skips indices: nothing is loaded for them). The count is the data module's state, not only the
  loader's: Lightning builds the loader before it restores a checkpoint when the LR schedule asks
  for ``estimated_stepping_batches``, and then never hands the loader its saved state.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Sampler

from datamodules.records import EpochState


def sum_counts(batches: Iterable[dict[str, Any]]) -> dict[str, float]:
    total: dict[str, float] = {}
    for b in batches:
        for k, v in b["counts"].items():
            total[k] = total.get(k, 0) + v
    return total


@dataclass
class EpochProgress:
    """How many training batches of ``epoch`` this rank has handed to the training step."""

    epoch: int = 0
    consumed: int = 0

    def start(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.consumed = int(epoch), 0

    def state_dict(self) -> EpochState:
        return {"epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: EpochState) -> None:
        self.epoch, self.consumed = int(state.get("epoch", 0)), int(state.get("consumed", 0))


class StepWindows:
    """A training loader whose batches come in optimizer-step windows (see the module docstring).

    ``limit``: batches per epoch per rank (a stream without a natural end); ``progress``: the
    epoch's batches already consumed before a restart, which ``limit`` then no longer yields.
    Lightning reads ``sampler`` to call ``set_epoch`` on it, as for a plain DataLoader.
    """

    def __init__(
        self,
        loader: Iterable[dict[str, Any]],
        size: int,
        *,
        limit: int | None = None,
        progress: EpochProgress | None = None,
    ):
        if size < 1:
            raise ValueError(f"accumulation window size must be >= 1, got {size}")
        self.loader, self.size, self.limit = loader, int(size), limit
        self.progress = progress or EpochProgress()

    @property
    def sampler(self):
        return getattr(self.loader, "sampler", None)

    @property
    def batch_sampler(self):
        return getattr(self.loader, "batch_sampler", None)

    def __len__(self) -> int:
        return self.limit if self.limit is not None else len(self.loader)  # type: ignore[arg-type]

    # the same progress as the data module's state (see the module docstring); being "stateful"
    # also tells Lightning that this loader resumes mid-epoch
    def state_dict(self) -> EpochState:
        return self.progress.state_dict()

    def load_state_dict(self, state: EpochState) -> None:
        self.progress.load_state_dict(state)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        done = self.progress.consumed  # batches of this epoch used before a restart
        sampler = self.sampler
        if self.limit is None and done and hasattr(sampler, "skip"):
            sampler.skip(done * int(self.loader.batch_size))  # type: ignore[attr-defined]
        batches = iter(self.loader)
        if self.limit is not None:
            batches = itertools.islice(batches, max(0, self.limit - done))
        while True:
            window = list(itertools.islice(batches, self.size))
            if not window:
                return
            counts = sum_counts(window)
            for i, batch in enumerate(window):
                batch["window"] = {"counts": counts, "index": i, "size": len(window)}
                yield batch


class StepSampler(Sampler[int]):
    """A seeded distributed sampler: pass ``epoch`` permutes all ``n`` indices (seed, epoch), pads
    them to a multiple of ``world_size`` by repeating the first ones, and rank ``r`` takes every
    ``world_size``-th from ``r``, so the ranks' batches of a step together are exactly the batch
    one process of ``world_size`` x the batch size would draw. ``skip(k)`` starts this pass
    after its first ``k`` indices (a resumed epoch)."""

    def __init__(self, n: int, *, rank: int = 0, world_size: int = 1, shuffle: bool = True, seed: int = 0):
        if n < 1:
            raise ValueError("the sampler needs at least one sample")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.n, self.rank, self.world_size, self.shuffle, self.seed = n, rank, world_size, shuffle, seed
        self.epoch, self._skip = 0, 0

    def set_epoch(self, epoch: int) -> None:
        if int(epoch) != self.epoch:
            self._skip = 0
        self.epoch = int(epoch)

    def skip(self, k: int) -> None:
        self._skip = int(k)

    def __len__(self) -> int:
        return math.ceil(self.n / self.world_size)

    def indices(self) -> list[int]:
        if self.shuffle:
            order = torch.randperm(
                self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)
            ).tolist()
        else:
            order = list(range(self.n))
        total = len(self) * self.world_size
        order += (order * math.ceil(total / self.n))[: total - self.n]
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices()[self._skip :])


class BalancedStepSampler(StepSampler):
    """The reference's data mix (``dataset.mix=balanced``): every batch holds one source, the
    sources take turns, and the smaller ones are redrawn until the largest is used up.

    ``sources[i]`` is the source of sample ``i``. Pass ``epoch`` takes, per source, blocks of
    ``batch_size x world_size`` indices from that source's own seeded permutation (re-permuted each
    time it runs out), one block per source in turn, for as many rounds as the largest source needs;
    rank ``r`` takes every ``world_size``-th index, so each rank's batch of a step comes from the
    block's source. ``skip`` and the rank split work as in :class:`StepSampler`."""

    def __init__(
        self,
        sources: list[int],
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        seed: int = 0,
    ):
        super().__init__(len(sources), rank=rank, world_size=world_size, shuffle=shuffle, seed=seed)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.members: list[list[int]] = []
        for name in sorted(set(sources)):
            self.members.append([i for i, s in enumerate(sources) if s == name])
        self.block = batch_size * world_size
        self.rounds = math.ceil(max(len(m) for m in self.members) / self.block)

    def __len__(self) -> int:
        return self.rounds * len(self.members) * self.block // self.world_size

    def _stream(self, k: int, members: list[int]) -> Iterator[int]:
        cycle = 0
        while True:
            if self.shuffle:
                gen = torch.Generator().manual_seed(
                    ((self.seed + self.epoch) * 1_000_003 + k) * 1_009 + cycle
                )
                yield from (members[j] for j in torch.randperm(len(members), generator=gen).tolist())
            else:
                yield from members
            cycle += 1

    def indices(self) -> list[int]:
        streams = [self._stream(k, m) for k, m in enumerate(self.members)]
        order: list[int] = []
        for _ in range(self.rounds):
            for stream in streams:
                order += [next(stream) for _ in range(self.block)]
        return order[self.rank :: self.world_size]
