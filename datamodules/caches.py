"""The data side of the feature-cache passes (``python -m nextgpt.cache``): what a source holds,
and the ImageBind and caption-embedding caches of shard sources, written beside their shards.

The stores, their fingerprints and the encoding of files live in :mod:`nextgpt.cache`; this
module only knows how to walk the data (JSON layout or shards) and which process takes which share.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import torch
from tqdm import tqdm

from datamodules.nextgpt_layout import read_source
from datamodules.shard_versions import ShardVersions
from datamodules.shards import ShardStream
from datamodules.shards.sample import ShardSample
from datamodules.source_files import INDEX_SUFFIX, source_shards
from nextgpt import modality as modality_registry
from nextgpt.cache.encode import StoreLookup, compute_captions, media_key, shard_folder, shard_media_store
from nextgpt.cache.store import FeatureStore, cache_base
from nextgpt.data_source import DataSource
from nextgpt.model_spec import ModelSpec

log = logging.getLogger(__name__)


def source_contents(source: DataSource) -> tuple[dict[str, str], list[str]]:
    """Every media item (key -> path) and every caption of one source, over all JSON kinds present."""
    media: dict[str, str] = {}
    captions: list[str] = []
    foreign = source.format != "nextgpt"  # an original stage-3 file: instruct only
    for objective in ("instruct",) if foreign else ("caption", "generate", "instruct"):
        try:
            # caption and generate read the same <name>.json: its bad entries are named once
            convs, _ = read_source(
                source.name,
                source.modality,
                source.data_root,
                objective,
                warn=objective != "generate",
                fmt=source.format,
                file=source.file,
            )
        except FileNotFoundError as e:
            log.info("feature cache: %s", e)
            continue
        for c in convs:
            for _, path in c.media_in:
                media[media_key(source.data_root, path)] = path
            captions += [cap for _, cap in c.captions_out]
    return media, captions


def compute_shard_media(
    store: FeatureStore,
    paths: list[Path],
    modality: str,
    encoder,
    *,
    batch_size: int,
    dtype: str = "float16",
    rank: int = 0,
    world_size: int = 1,
    part_size: int = 4096,
) -> int:
    """Encode the input media of shards into ``store``: this process's share of the samples
    (``rank`` of ``world_size``, split as training splits them), skipping members already cached
    (their bytes are not even read), so an interrupted pass resumes and several processes fill one
    store at once (each writes parts of its own). Returns the rows added."""
    mod = modality_registry.get(modality)
    device = next(encoder.parameters()).device
    stream = ShardStream(
        paths,
        objective="caption",
        modality=modality,
        rank=rank,
        world_size=world_size,
        epochs=1,
        max_skip_fraction=None,
        feature_lookup=StoreLookup({p: store for p in paths}),
    )
    pending: list[tuple[str, torch.Tensor]] = []
    rows_keys: list[str] = []
    rows: list[np.ndarray] = []
    failed: dict[str, str] = {}
    added = 0

    def encode() -> None:
        nonlocal pending
        if pending:
            x = torch.stack([t for _, t in pending]).to(device, dtype=next(encoder.parameters()).dtype)
            with torch.no_grad():
                feats = encoder.features(mod.encoder_modality, x).float().cpu().numpy()
            rows_keys.extend(k for k, _ in pending)
            rows.append(feats.astype(dtype))
            pending = []

    def flush() -> None:
        nonlocal added, rows_keys, rows
        if rows_keys:
            store.add(rows_keys, np.concatenate(rows), f"ImageBind {modality} features of shard members")
            added += len(rows_keys)
            rows_keys, rows = [], []

    share = -(-stream.total // world_size)
    with tqdm(
        total=share, desc=f"ImageBind {modality} {store.directory.name} (rank {rank})", unit="item"
    ) as bar:
        for sample in cast(Iterable[ShardSample], stream):  # a weighted stream yields samples, not batches
            bar.update(1)
            for _, member in sample.conversation.media_in:
                if member in sample.features or member in store.failed or member in failed:
                    continue
                data = io.BytesIO(sample.media[member])
                data.name = f"{sample.shard}:{member}"
                try:
                    pending.append((member, mod.load(data)))
                except (ValueError, OSError, RuntimeError) as e:
                    failed[member] = str(e)
                    log.warning("feature cache: skipped %s:%s: %s", sample.shard, member, e)
            if len(pending) >= batch_size:
                encode()
            if len(rows_keys) >= part_size:
                flush()
    encode()
    flush()
    store.add_failed(failed)
    return added


@dataclass(frozen=True)
class ShardPass:
    """What the shard-side cache pass reads of the config: the ``dataset.sources``, where their shards
    go (``paths.shards``, ``dataset.shard_size``, ``dataset.source_changed``) and how features are
    computed (``cache.batch_size``, ``cache.dtype``)."""

    sources: tuple[DataSource, ...]
    shards_root: str
    shard_size: int = 1000
    source_changed: str = "rewrite"
    batch_size: int = 64
    dtype: str = "float16"


def build_shard_caches(
    data: ShardPass,
    model: ModelSpec,
    encoder,
    conditioners,
    fallback: Path,
    rank: int,
    world: int,
    device: str = "cpu",
) -> dict[str, int]:
    """ImageBind features of every shard source's pair-shard members (stage 1) and the decoder text
    embeddings of its captions (stages 2-3), beside the shards. Shards that do not exist yet are
    written first, as a training run would. Several processes (``torchrun --nproc-per-node N -m
    nextgpt.cache ...``) each take their share."""
    if rank == 0:
        write_missing_shards(data)
    report: dict[str, int] = {}
    for source in data.sources:
        paths = wait_for_shards(source, data.shards_root, rank)
        if not paths:
            log.warning("feature cache: no pair shards of %r: skipped", source.name)
            continue
        if encoder is not None:
            store = shard_media_store(
                shard_folder(source, paths), source.modality, "pairs", model.encoder, fallback
            )
            added = compute_shard_media(
                store,
                paths,
                source.modality,
                encoder,
                batch_size=data.batch_size,
                dtype=data.dtype,
                rank=rank,
                world_size=world,
            )
            store.refresh()
            report[str(store.directory)] = len(store)
            log.info(
                "%s: %d ImageBind features (%d new here, %d failed) in %s",
                source.name,
                len(store),
                added,
                len(store.failed),
                store.directory,
            )
        conditioner = conditioners.get(source.modality)
        if conditioner is not None:  # this process's share of the captions (no media read: text-to-X pairs)
            stream = ShardStream(
                paths,
                objective="generate",
                modality=source.modality,
                rank=rank,
                world_size=world,
                epochs=1,
                max_skip_fraction=None,
            )
            samples = cast(Iterable[ShardSample], stream)  # a weighted stream yields samples, not batches
            captions = [cap for sample in samples for _, cap in sample.conversation.captions_out]
            store = FeatureStore.at(
                cache_base(shard_folder(source, paths), fallback),
                f"text_{source.modality}",
                conditioner.fingerprint(),
            )
            added = compute_captions(store, captions, conditioner.to(device), dtype=data.dtype)
            store.refresh()
            report[str(store.directory)] = len(store)
            log.info(
                "%s: %d caption embeddings (%d new here) in %s",
                source.name,
                len(store),
                added,
                store.directory,
            )
    return report


def wait_for_shards(source: DataSource, shards_root: str, rank: int, timeout: float = 3600.0) -> list[Path]:
    """The source's pair shards; on ranks > 0, once rank 0 has written them (their index is there)."""
    deadline = time.monotonic() + (timeout if rank else 0)
    while True:
        paths = source_shards(source, "caption", shards_root)
        ready = source.urls or (paths and (paths[0].parent / f"{source.name}-pairs{INDEX_SUFFIX}").is_file())
        if ready or time.monotonic() > deadline:
            return paths
        time.sleep(2.0)


def write_missing_shards(data: ShardPass) -> None:
    """The pair shards of the sources that have none of their current data yet, as a training run
    writes them (``ShardDataModule.prepare_data``)."""
    versions = ShardVersions("caption", data.shards_root, data.shard_size, data.source_changed)
    for source in data.sources:
        versions.prepare(source)
