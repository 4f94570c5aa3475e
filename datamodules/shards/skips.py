"""Bad samples of a shard stream: counted by reason, logged with ``shard:key`` once, and held against
``max_skip_fraction`` (see the package docstring for where a worker's skips are counted)."""

from __future__ import annotations

import logging
from collections import Counter

from datamodules.records import SkipState
from datamodules.shards.sample import StreamPosition
from nextgpt.runs import RunError

log = logging.getLogger(__name__)


class TooManySkipped(RunError):
    """More bad samples than ``max_skip_fraction`` allows: likely a broken conversion, not bad luck."""


class SkipLedger:
    """Samples seen and skipped (by reason) of one stream, and the limit on them.

    In a dataloader worker (``in_worker``) a skip is neither logged nor checked: its line waits for
    the next good sample, which carries it to the training process (``take_notes``), where
    :meth:`absorb` counts and logs it once."""

    def __init__(self, max_skip_fraction: float | None = 0.1, min_samples: int = 20):
        if max_skip_fraction is not None and not 0.0 <= max_skip_fraction <= 1.0:
            raise ValueError(f"max_skip_fraction must be in [0, 1] or None, got {max_skip_fraction}")
        self.max_skip_fraction, self.min_samples = max_skip_fraction, min_samples
        self.seen = 0
        self.skipped: Counter[str] = Counter()
        self.label = "the stream"  # what the errors name (the stream's repr)
        self.unlogged: list[str] = []  # in a worker: skips since the last good sample, logged when consumed

    def count_seen(self, in_worker: bool) -> None:
        self.seen += 1
        if not in_worker:  # a worker's copy also counts read-ahead: checked in absorb
            self.check()

    def skip(self, where: str, reason: str, detail: str, pending: Counter[str], in_worker: bool) -> None:
        """One bad sample read here; ``pending``: the consumer's skips since its last good sample."""
        self.skipped[reason] += 1
        pending[reason] += 1
        line = f"{where}: {reason}" + (f" ({detail})" if detail else "")
        if not in_worker:
            log.warning("skipped %s", line)
        else:  # logged once, by absorb, if and when the trainer receives the next sample
            self.unlogged.append(line)
        self.count_seen(in_worker)

    def take_notes(self) -> tuple[str, ...]:
        """The log lines of the skips not logged yet (a worker's), for the next good sample to carry."""
        notes, self.unlogged = tuple(self.unlogged), []
        return notes

    def record_skip(self, where: str, reason: str, detail: str = "") -> None:
        """A sample that failed after the stream handed it over (e.g. decoded later)."""
        self.skipped[reason] += 1
        log.warning("skipped %s: %s%s", where, reason, f" ({detail})" if detail else "")
        self.check()

    def absorb(self, position: StreamPosition) -> None:
        """A worker's counts and skip lines up to a sample the trainer received (not checked here:
        the caller checks once per batch)."""
        self.seen += position.seen
        self.skipped.update(dict(position.skipped))
        for line in position.skip_notes:
            log.warning("skipped %s", line)

    def check(self) -> None:
        bad = sum(self.skipped.values())
        if (
            self.max_skip_fraction is None
            or self.seen < self.min_samples
            or bad <= self.max_skip_fraction * self.seen
        ):
            return
        raise TooManySkipped(
            f"{bad} of {self.seen} samples skipped ({bad / self.seen:.1%} > max_skip_fraction "
            f"{self.max_skip_fraction:.1%}) in {self.label}; by reason: {dict(self.skipped)}. "
            "Check the shards (python -m datamodules.prepare) or raise max_skip_fraction."
        )

    def load(self, state: SkipState) -> None:
        self.seen, self.skipped = int(state["seen"]), Counter(state["skipped"])


class PassWatch:
    """One consumer's passes: a pass it read to the end without one usable sample is an error
    (a resumed pass excepted: its samples before the resume point were delivered before)."""

    def __init__(self, ledger: SkipLedger, first_epoch: int, after: int, who: str):
        self.ledger, self.first_epoch, self.after, self.who = ledger, first_epoch, after, who
        self.in_pass: int | None = None  # the consumer's current pass
        self.delivered, self.tried = False, 0  # whether it gave a sample; samples read in it

    def read(self, epoch: int) -> None:
        """A sample of pass ``epoch`` is read next."""
        if epoch != self.in_pass:
            if (
                self.in_pass is not None
                and not self.delivered
                and (self.in_pass != self.first_epoch or self.after < 0)
            ):
                for line in self.ledger.unlogged[:20]:  # a worker's: no sample will carry them to the trainer
                    log.warning("skipped %s", line)
                raise TooManySkipped(
                    f"no usable sample in a whole pass: all {self.tried} samples that {self.who} "
                    f"reads from {self.ledger.label} were skipped; by reason: {dict(self.ledger.skipped)}. "
                    "Check the shards (python -m datamodules.prepare) and their source"
                )
            self.in_pass, self.delivered, self.tried = epoch, False, 0
        self.tried += 1
