"""What the shard stream hands over: a good sample, where it sat in the order, and why a bad one was skipped."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from nextgpt.prompts import Conversation


class SkipSample(Exception):
    """A sample that can not be used: ``reason`` is the counter key, ``detail`` goes to the log."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason, self.detail = reason, detail
        super().__init__(f"{reason} ({detail})" if detail else reason)


class StreamPosition(NamedTuple):
    """Where one yielded sample sits; a NamedTuple so collate, pin_memory and Lightning pass it through."""

    epoch: int  # pass number
    order_index: int  # index in that pass's global order (not ``index``: that would shadow tuple.index)
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
