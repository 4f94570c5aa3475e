"""What goes into a feature cache and how it is named: ImageBind features of media files and the
decoders' text embeddings of captions, each store named by a fingerprint of the frozen model and
the preprocessing that made it (a changed encoder or preprocessing never serves stale rows).

The passes over whole data sets (``python -m nextgpt.cache``) live in :mod:`nextgpt.cli.cache`;
the shard-side pass in :mod:`datamodules.caches`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import torch

from nextgpt import modality as modality_registry
from nextgpt.cache.store import FeatureStore, cache_base, caption_key, file_signature, fingerprint
from nextgpt.data_source import DataSource
from nextgpt.encoders.imagebind_config import ImageBindConfig
from nextgpt.model_spec import EncoderSpec

log = logging.getLogger(__name__)

# Bump when nextgpt/encoders/preprocess/ changes what it computes: old features become stale.
PREPROCESS_VERSION = 1


def imagebind_fingerprint(encoder: EncoderSpec, modality: str) -> str:
    """ImageBind weights + architecture + output dtype + the modality's preprocessing (+ the
    original's un-renormalised features, ``model.encoder.renormalize=false``)."""
    arch = ImageBindConfig.from_dict(dict(encoder.arch))
    mod = modality_registry.get(modality)
    original_norm = () if encoder.renormalize else ("not renormalised",)  # the default keeps its caches
    return fingerprint(
        "imagebind",
        repr(arch),
        file_signature(encoder.checkpoint),
        encoder.dtype,
        mod.name,
        mod.encoder_modality,
        PREPROCESS_VERSION,
        *original_norm,
    )


def media_store(source: DataSource, encoder: EncoderSpec, fallback: str | Path) -> FeatureStore:
    base = cache_base(source.data_root, fallback)
    return FeatureStore.at(
        base, f"imagebind_{source.modality}", imagebind_fingerprint(encoder, source.modality)
    )


def caption_store(source: DataSource, conditioner, fallback: str | Path) -> FeatureStore:
    return FeatureStore.at(
        cache_base(source.data_root, fallback), f"text_{source.modality}", conditioner.fingerprint()
    )


def shard_folder(source: DataSource, shard_paths: list[Path]) -> Path:
    """Where a shard source's caches go: beside its shards (the folder of the first)."""
    return Path(shard_paths[0]).parent


def shard_media_store(
    folder: str | Path, modality: str, shard_set: str, encoder: EncoderSpec, fallback: str | Path
) -> FeatureStore:
    """ImageBind features of a shard set's input media, keyed by tar member (``<key>.<ext>``)."""
    return FeatureStore.at(
        cache_base(folder, fallback),
        f"imagebind_{modality}_{shard_set}",
        imagebind_fingerprint(encoder, modality),
    )


class StoreLookup:
    """``feature_lookup`` for a ShardStream: the cached feature of a shard's member, or None.
    A class rather than a closure, so that it travels to dataloader workers."""

    def __init__(self, stores: Mapping[Path, FeatureStore]):
        self.stores = {Path(k): v for k, v in stores.items()}

    def __call__(self, shard: Path, member: str):
        store = self.stores.get(Path(shard))
        return store.get(member) if store is not None and member in store else None


def media_key(root: str | Path, path: str | Path) -> str:
    """A media item's cache key: its path relative to the source root (``images/x.jpg``)."""
    try:
        return Path(path).relative_to(Path(root)).as_posix()
    except ValueError:
        return Path(path).as_posix()


def compute_media(
    store: FeatureStore,
    items: Mapping[str, str],
    encoder,
    modality: str,
    *,
    batch_size: int,
    dtype: str = "float16",
) -> int:
    """Encode the missing ``items`` (key -> media path) with the frozen ImageBind; undecodable
    files are recorded in ``failed.json`` with the reason, and skipped."""
    mod = modality_registry.get(modality)
    device = next(encoder.parameters()).device

    def compute(keys: list[str]):
        done, tensors, failed = [], [], {}
        for k in keys:
            try:
                tensors.append(mod.load(items[k]))
                done.append(k)
            except (ValueError, OSError, RuntimeError) as e:
                failed[k] = str(e)
                log.warning("feature cache: skipped %s: %s", items[k], e)
        if not done:
            return [], np.zeros((0,)), failed
        with torch.no_grad():
            x = torch.stack(tensors).to(device, dtype=next(encoder.parameters()).dtype)
            feats = encoder.features(mod.encoder_modality, x)
        return done, feats.float().cpu().numpy(), failed

    return store.complete(
        list(items),
        compute,
        batch_size=batch_size,
        dtype=dtype,
        description=f"ImageBind {modality} features",
        desc=f"ImageBind {modality} {store.directory.name}",
    )


def compute_captions(
    store: FeatureStore, captions: Iterable[str], conditioner, *, batch_size: int = 64, dtype: str = "float16"
) -> int:
    by_key = {caption_key(c): c for c in captions}

    def compute(keys: list[str]):
        return keys, conditioner.encode([by_key[k] for k in keys]).cpu().numpy(), {}

    return store.complete(
        list(by_key),
        compute,
        batch_size=batch_size,
        dtype=dtype,
        description=f"{conditioner.conditioning} of {conditioner.path}",
        desc=f"captions {store.directory.name}",
    )
