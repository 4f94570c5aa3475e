"""A shard stream's resumable position: per consumer (rank, worker slot) the last (pass, global index)
handed over, the worker rotation (which slot delivers a rank's next batch) and the current pass."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from datamodules.records import PassState
from datamodules.shards.order import Order
from datamodules.shards.sample import StreamPosition

Consumer = tuple[int, int]  # (rank, slot)
Progress = dict[Consumer, tuple[int, int]]  # consumer -> (pass, last global index handed over)


class Start(NamedTuple):
    """Where one consumer's iteration begins."""

    slot: int  # its slot within the rank: the worker id, rotated on resume
    first_epoch: int
    after: int  # the last global index of ``first_epoch`` handed over (-1: from the pass's start)


class StreamProgress:
    """What has been handed over. Moved by each yield until :meth:`consumed` is first called (the
    training process reporting what the training step received); from then on only by that."""

    def __init__(self) -> None:
        self.epoch = 0
        self.last: Progress = {}
        self.rotation: dict[int, int] = {}  # rank -> slot that delivers the next batch
        self.topology: tuple[int, int] | None = None  # (world_size, num_workers) the progress is for
        self.tracked = False  # consumed was called: yields no longer move the progress

    def set_epoch(self, epoch: int) -> None:
        if int(epoch) != self.epoch:
            self.last, self.rotation, self.topology = {}, {}, None
        self.epoch = int(epoch)

    def finished(self, epoch: int, rank: int, world: int, workers: int, order: Order) -> bool:
        """This rank's consumers have handed over every sample of pass ``epoch`` (a resumed end of pass)."""
        consumers = world * workers
        for slot in range(workers):
            c, stride = order.share(rank * workers + slot, consumers)
            e, last = self.last.get((rank, slot), (epoch - 1, -1))
            nxt = c if e < epoch else last + stride
            if e <= epoch and nxt < order.pass_length(consumers):
                return False
        return True

    def start(
        self, rank: int, world: int, worker: int, workers: int, order: Order, epochs: int | None
    ) -> Start:
        """Where worker ``worker`` of ``workers`` on ``rank`` continues; refuses another topology, and
        moves on to the next passes where a finite stream was restarted exactly at their end."""
        topology = (world, workers)
        if self.last and self.topology is not None and self.topology != topology:
            raise ValueError(
                f"this stream's state was saved with world_size={self.topology[0]} x num_workers={self.topology[1]};"
                f" it is now {world} x {workers}: exact resume needs the same ranks and dataloader workers"
            )
        resumed = bool(self.last)
        slot = (worker + self.rotation.get(rank, 0)) % workers if resumed else worker
        if (
            epochs is not None
            and resumed
            and self.finished(self.epoch + epochs - 1, rank, world, workers, order)
        ):
            self.epoch += epochs  # restarted exactly at the end of its passes: run the next ones
        first_epoch, after = self.epoch, -1
        e, last = self.last.get((rank, slot), (self.epoch - 1, -1))
        if e >= self.epoch:
            first_epoch, after = e, last
        return Start(slot, first_epoch, after)

    def delivered(self, rank: int, slot: int, epoch: int, index: int, topology: tuple[int, int]) -> None:
        """A sample yielded by this process's copy of the stream."""
        if not self.tracked:
            self.last[(rank, slot)] = (epoch, index)
            self.topology = topology

    def consumed(self, p: StreamPosition) -> None:
        """A sample the training step received."""
        self.tracked = True
        self.last[(p.rank, p.slot)] = (p.epoch, p.order_index)
        self.rotation[p.rank] = (p.slot + 1) % p.num_workers
        self.topology = (p.world_size, p.num_workers)

    def of_rank(self, rank: int) -> dict[str, Any]:
        """This rank's part, to gather from every rank."""
        return {
            "progress": {k: v for k, v in self.last.items() if k[0] == rank},
            "rotation": {rank: self.rotation[rank]} if rank in self.rotation else {},
            "topology": self.topology,
        }

    def state(self, last: Progress, rotation: Mapping[int, int]) -> PassState:
        """Plain data (JSON-safe): the pass, the topology and the given (possibly gathered) progress."""
        return {
            "epoch": self.epoch,
            "topology": list(self.topology) if self.topology else None,
            "progress": {f"{r}:{s}": [e, i] for (r, s), (e, i) in sorted(last.items())},
            "rotation": {str(r): v for r, v in rotation.items()},
        }

    def load(self, state: PassState) -> None:
        self.epoch = int(state["epoch"])
        topology = state["topology"]
        self.topology = (int(topology[0]), int(topology[1])) if topology else None
        self.last = {}
        for key, (e, i) in state["progress"].items():
            r, s = key.split(":")
            self.last[(int(r), int(s))] = (int(e), int(i))
        self.rotation = {int(r): int(v) for r, v in state["rotation"].items()}
        self.tracked = False
