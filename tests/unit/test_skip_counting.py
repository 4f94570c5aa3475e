"""A bad sample read by dataloader workers is counted, warned about and held against the limit once,
where the trainer receives it: workers read ahead of the trainer, and what they read but the trainer
never received is read again by the next epoch's workers."""

from __future__ import annotations

import io
import logging
from collections import Counter
from itertools import islice
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from torch.utils.data import DataLoader

from datamodules import shards
from datamodules.shard_writer import pair_record, write_shards
from datamodules.shards import ShardStream, TrackingCollate
from datamodules.shards.sample import ShardSample
from datamodules.shards.skips import TooManySkipped
from nextgpt import modality as modality_registry


def decode(sample: ShardSample):
    ((name, member),) = sample.conversation.media_in
    buf = io.BytesIO(sample.media[member])
    buf.name = f"{sample.shard}:{member}"
    return modality_registry.get(name).load(buf)


def one_bad_in_eleven(tmp_path: Path) -> Path:
    good = tmp_path / "good.png"
    Image.fromarray(np.full((8, 8, 3), 100, np.uint8)).save(good)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    recs = [pair_record(f"s{i:02d}", "image", f"caption {i}", bad if i == 3 else good) for i in range(11)]
    write_shards(recs, tmp_path / "shards", name="p", shard_size=100)
    return tmp_path / "shards"


def count(items: list) -> dict:
    return {"n": len(items)}


def test_read_ahead_of_dataloader_workers_is_not_counted(tmp_path: Path, caplog) -> None:
    """Three epochs of three batches of 4 on 11 samples, one bad, as the shard data module runs
    them: two workers read ahead into passes the trainer only reaches later, and the next epoch's
    workers read those samples again. Before: each worker counted its reads, read-ahead included,
    on top of the trainer's totals, and checked the limit on that: "4 of 29 samples skipped" raised
    in a worker while the trainer had received 2 bad of 30 (6.7%); and it warned about every read."""
    folder = one_bad_in_eleven(tmp_path)
    stream = ShardStream(
        folder,
        modality="image",
        transform=decode,
        epochs=None,
        shuffle=True,
        seed=0,
        rank=0,
        world_size=1,
        max_skip_fraction=0.12,
        min_samples=20,
    )
    loader = DataLoader(stream, batch_size=4, num_workers=2, collate_fn=TrackingCollate(count))
    delivered = 0
    with caplog.at_level(logging.WARNING, logger="datamodules.shards"):
        for _ in range(3):
            for batch in islice(loader, 3):
                stream.mark_consumed(batch.pop("stream_positions"))
                delivered += batch["n"]
    skips = stream.skipped["undecodable media"]
    assert (
        delivered == 36
        and stream.seen == delivered + skips
        and stream.skipped == Counter({"undecodable media": skips})
    )
    assert 3 <= skips <= -(-stream.seen // 11)  # once per pass the trainer reached into
    # one line per counted skip, written in this (the training) process
    assert (
        len([r for r in caplog.records if "p-000000.tar:s03: undecodable media" in r.getMessage()]) == skips
    )


def test_a_workers_skips_are_warned_about_and_counted_when_consumed(
    tmp_path: Path, monkeypatch, caplog
) -> None:
    folder = one_bad_in_eleven(tmp_path)
    monkeypatch.setattr(
        shards, "get_worker_info", lambda: SimpleNamespace(id=0, num_workers=1)
    )  # as in a worker
    stream = ShardStream(
        folder, modality="image", transform=decode, epochs=1, max_skip_fraction=0.0, min_samples=1
    )
    with caplog.at_level(logging.WARNING, logger="datamodules.shards"):
        samples = list(stream)  # the worker neither logs nor checks the limit: it may be reading ahead
        assert len(samples) == 10 and not caplog.records
    batch = TrackingCollate(count)(samples)
    consumer = ShardStream(folder, modality="image", max_skip_fraction=None)
    with caplog.at_level(logging.WARNING, logger="datamodules.shards"):
        consumer.mark_consumed(batch["stream_positions"])
    assert consumer.skipped == Counter({"undecodable media": 1}) and consumer.seen == 11
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith("skipped p-000000.tar:s03: undecodable media (cannot decode p-000000.tar:s03.png")
    strict = ShardStream(folder, modality="image", max_skip_fraction=0.05, min_samples=1)
    with pytest.raises(
        TooManySkipped, match="1 of 11 samples skipped"
    ):  # the limit: on what the trainer received
        strict.mark_consumed(batch["stream_positions"])
