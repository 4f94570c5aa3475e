"""Feature caches of a data set: ImageBind features of every item and, for every caption, its
embedding by each configured decoder's own text encoder.

    python -m nextgpt.cache dataset=cc3m paths.data_root=DIR [model=nextgpt_7b_legacy]

Runs on the training config tree, so ``dataset=``, ``model=`` and ``paths.*`` mean what they
mean for ``train.py``. Stages 1-3 find the caches by the same fingerprints and use them.
"""
from __future__ import annotations

import io
import logging
import os
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch

from nextgpt import modality as modality_registry
from nextgpt.features import FeatureStore, cache_base, caption_key, file_signature, fingerprint

log = logging.getLogger(__name__)

# Bump when nextgpt/encoders/preprocess.py changes what it computes: old features become stale.
PREPROCESS_VERSION = 1


def imagebind_fingerprint(encoder_cfg: Mapping[str, Any], modality: str) -> str:
    """ImageBind weights + architecture + output dtype + the modality's preprocessing."""
    from nextgpt.encoders.imagebind import ImageBindConfig

    arch = ImageBindConfig.from_dict(dict(encoder_cfg["arch"]))
    mod = modality_registry.get(modality)
    return fingerprint("imagebind", repr(arch), file_signature(encoder_cfg["checkpoint"]), encoder_cfg.get("dtype"),
                       mod.name, mod.encoder_modality, PREPROCESS_VERSION)


def media_store(source: Mapping[str, Any], encoder_cfg: Mapping[str, Any], fallback: str | Path) -> FeatureStore:
    base = cache_base(source["root"], fallback)
    return FeatureStore.at(base, f"imagebind_{source['modality']}", imagebind_fingerprint(encoder_cfg, source["modality"]))


def caption_store(source: Mapping[str, Any], conditioner, fallback: str | Path) -> FeatureStore:
    return FeatureStore.at(cache_base(source["root"], fallback), f"text_{source['modality']}", conditioner.fingerprint())


def shard_folder(source: Mapping[str, Any], shard_paths: list[Path]) -> Path:
    """Where a shard source's caches go: beside its shards (the folder of the first)."""
    return Path(shard_paths[0]).parent


def shard_media_store(folder: str | Path, modality: str, shard_set: str, encoder_cfg: Mapping[str, Any],
                      fallback: str | Path) -> FeatureStore:
    """ImageBind features of a shard set's input media, keyed by tar member (``<key>.<ext>``)."""
    return FeatureStore.at(cache_base(folder, fallback), f"imagebind_{modality}_{shard_set}",
                           imagebind_fingerprint(encoder_cfg, modality))


class StoreLookup:
    """``feature_lookup`` for a ShardStream: the cached feature of a shard's member, or None.
    A class rather than a closure, so that it travels to dataloader workers."""

    def __init__(self, stores: Mapping[Path, FeatureStore]):
        self.stores = {Path(k): v for k, v in stores.items()}

    def __call__(self, shard: Path, member: str):
        store = self.stores.get(Path(shard))
        return store.get(member) if store is not None and member in store else None


def compute_shard_media(store: FeatureStore, paths: list[Path], modality: str, encoder, *, batch_size: int,
                        dtype: str = "float16", rank: int = 0, world_size: int = 1, part_size: int = 4096) -> int:
    """Encode the input media of shards into ``store``: this process's share of the samples
    (``rank`` of ``world_size``, split as training splits them), skipping members already cached
    (their bytes are not even read), so an interrupted pass resumes and several processes fill one
    store at once (each writes parts of its own). Returns the rows added."""
    from tqdm import tqdm

    from datamodules.shards import ShardStream

    mod = modality_registry.get(modality)
    device = next(encoder.parameters()).device
    stream = ShardStream(paths, task="caption", modality=modality, rank=rank, world_size=world_size, epochs=1,
                         max_skip_fraction=None, feature_lookup=StoreLookup({p: store for p in paths}))
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
                feats = encoder.encode(mod.encoder_modality, x, renormalize=True).float().cpu().numpy()
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
    with tqdm(total=share, desc=f"ImageBind {modality} {store.directory.name} (rank {rank})", unit="item") as bar:
        for sample in stream:
            bar.update(1)
            for name, member in sample.conversation.media_in:
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


def media_key(root: str | Path, path: str | Path) -> str:
    """A media item's cache key: its path relative to the source root (``images/x.jpg``)."""
    try:
        return Path(path).relative_to(Path(root)).as_posix()
    except ValueError:
        return Path(path).as_posix()


def compute_media(store: FeatureStore, items: Mapping[str, str], encoder, modality: str, *, batch_size: int,
                  dtype: str = "float16") -> int:
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
            feats = encoder.encode(mod.encoder_modality, x, renormalize=True)
        return done, feats.float().cpu().numpy(), failed

    return store.complete(list(items), compute, batch_size=batch_size, dtype=dtype,
                          description=f"ImageBind {modality} features", desc=f"ImageBind {modality} {store.directory.name}")


def compute_captions(store: FeatureStore, captions: Iterable[str], conditioner, *, batch_size: int = 64,
                     dtype: str = "float16") -> int:
    by_key = {caption_key(c): c for c in captions}

    def compute(keys: list[str]):
        return keys, conditioner.encode([by_key[k] for k in keys]).cpu().numpy(), {}

    return store.complete(list(by_key), compute, batch_size=batch_size, dtype=dtype,
                          description=f"{conditioner.conditioning} of {conditioner.path}",
                          desc=f"captions {store.directory.name}")


def source_contents(source: Mapping[str, Any]) -> tuple[dict[str, str], list[str]]:
    """Every media item (key -> path) and every caption of one source, over all JSON kinds present."""
    from datamodules.nextgpt_layout import read_source

    media: dict[str, str] = {}
    captions: list[str] = []
    for task in ("caption", "generate", "instruct"):
        try:
            convs, _ = read_source(source["name"], source["modality"], source["root"], task)
        except FileNotFoundError as e:
            log.info("feature cache: %s", e)
            continue
        for c in convs:
            for _, path in c.media_in:
                media[media_key(source["root"], path)] = path
            captions += [cap for _, cap in c.captions_out]
    return media, captions


def build_caches(cfg) -> dict[str, int]:
    """The ``python -m nextgpt.cache`` pass over every source of ``cfg.dataset``."""
    from omegaconf import OmegaConf

    from nextgpt.model import load_conditioners, load_encoder

    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    fallback = Path(cfg.paths.cache_dir) / "features"
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))  # torchrun -m nextgpt.cache
    device = cfg.cache.device
    if device == "cuda" and world > 1:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    what = set(cfg.cache.what)
    encoder = load_encoder(model_cfg["encoder"]).to(device) if "media" in what else None
    conditioners = load_conditioners(model_cfg) if "captions" in what else {}
    report: dict[str, int] = {}
    if cfg.dataset.get("loader", "json") == "shards":
        return build_shard_caches(cfg, model_cfg, encoder, conditioners, fallback, rank, world, device)
    for source in OmegaConf.to_container(cfg.dataset.sources, resolve=True):
        media, captions = source_contents(source)
        if encoder is not None:
            store = media_store(source, model_cfg["encoder"], fallback)
            added = compute_media(store, media, encoder, source["modality"], batch_size=int(cfg.cache.batch_size),
                                  dtype=cfg.cache.dtype)
            report[str(store.directory)] = len(store)
            log.info("%s: %d ImageBind features (%d new, %d failed) in %s", source["name"], len(store), added,
                     len(store.failed), store.directory)
        conditioner = conditioners.get(source["modality"])
        if conditioner is not None:
            store = caption_store(source, conditioner.to(device), fallback)
            added = compute_captions(store, captions, conditioner, dtype=cfg.cache.dtype)
            report[str(store.directory)] = len(store)
            log.info("%s: %d caption embeddings (%d new) in %s", source["name"], len(store), added, store.directory)
    return report


def build_shard_caches(cfg, model_cfg, encoder, conditioners, fallback: Path, rank: int, world: int,
                       device: str = "cpu") -> dict[str, int]:
    """ImageBind features of every shard source's pair-shard members (stage 1) and the decoder text
    embeddings of its captions (stages 2-3), beside the shards. Shards that do not exist yet are
    written first, as a training run would. Several processes (``torchrun --nproc-per-node N -m
    nextgpt.cache ...``) each take their share."""
    from omegaconf import OmegaConf

    from datamodules.shards import ShardStream

    if rank == 0:
        _write_missing_shards(cfg)
    report: dict[str, int] = {}
    for source in OmegaConf.to_container(cfg.dataset.sources, resolve=True):
        paths = _wait_for_shards(source, cfg.paths.shards, rank)
        if not paths:
            log.warning("feature cache: no pair shards of %r: skipped", source["name"])
            continue
        if encoder is not None:
            store = shard_media_store(shard_folder(source, paths), source["modality"], "pairs", model_cfg["encoder"],
                                      fallback)
            added = compute_shard_media(store, paths, source["modality"], encoder, batch_size=int(cfg.cache.batch_size),
                                        dtype=cfg.cache.dtype, rank=rank, world_size=world)
            store.refresh()
            report[str(store.directory)] = len(store)
            log.info("%s: %d ImageBind features (%d new here, %d failed) in %s", source["name"], len(store), added,
                     len(store.failed), store.directory)
        conditioner = conditioners.get(source["modality"])
        if conditioner is not None:  # this process's share of the captions (no media read: text-to-X pairs)
            stream = ShardStream(paths, task="generate", modality=source["modality"], rank=rank, world_size=world,
                                 epochs=1, max_skip_fraction=None)
            captions = [cap for sample in stream for _, cap in sample.conversation.captions_out]
            store = FeatureStore.at(cache_base(shard_folder(source, paths), fallback), f"text_{source['modality']}",
                                    conditioner.fingerprint())
            added = compute_captions(store, captions, conditioner.to(device), dtype=cfg.cache.dtype)
            store.refresh()
            report[str(store.directory)] = len(store)
            log.info("%s: %d caption embeddings (%d new here) in %s", source["name"], len(store), added, store.directory)
    return report


def _wait_for_shards(source: Mapping[str, Any], shards_root: str, rank: int, timeout: float = 3600.0) -> list[Path]:
    """The source's pair shards; on ranks > 0, once rank 0 has written them (their index is there)."""
    import time

    from datamodules.prepare import INDEX_SUFFIX
    from datamodules.shard_datamodule import source_shards

    deadline = time.monotonic() + (timeout if rank else 0)
    while True:
        paths = source_shards(source, "caption", shards_root)
        ready = source.get("urls") or (paths and (paths[0].parent / f"{source['name']}-pairs{INDEX_SUFFIX}").is_file())
        if ready or time.monotonic() > deadline:
            return paths
        time.sleep(2.0)


def _write_missing_shards(cfg) -> None:
    from omegaconf import OmegaConf

    from datamodules.shard_datamodule import ShardDataModule

    dm = ShardDataModule(sources=OmegaConf.to_container(cfg.dataset.sources, resolve=True), task="caption",
                         model=OmegaConf.to_container(cfg.model, resolve=True), shards_root=cfg.paths.shards,
                         shard_size=int(cfg.dataset.get("shard_size", 1000)),
                         source_changed=str(cfg.dataset.get("source_changed", "rewrite")))
    dm.prepare_data()


def main() -> None:
    import hydra

    from nextgpt.config import main_guard, normalize_overrides, register_resolvers

    register_resolvers()
    sys.argv = [sys.argv[0], *normalize_overrides(sys.argv[1:])]
    config_dir = str(Path(__file__).resolve().parents[1] / "configs")

    @hydra.main(config_path=config_dir, config_name="cache", version_base="1.3")
    @main_guard
    def run(cfg) -> None:
        from nextgpt.config import ConfigError, backbone_path_errors, data_path_errors

        if cfg.model.get("build_tiny"):
            from nextgpt.tiny import build_all

            build_all(Path(cfg.paths.backbones))
        errors = backbone_path_errors(cfg) + data_path_errors(cfg, "caption")
        if errors:
            raise ConfigError(errors)
        if cfg.dataset.get("synthetic"):
            from datamodules.synthetic import write_synthetic

            write_synthetic(Path(cfg.dataset.synthetic.root), num_per_modality=int(cfg.dataset.synthetic.num_per_modality),
                            seed=int(cfg.dataset.synthetic.seed))
        for directory, n in build_caches(cfg).items():
            print(f"{n:8d}  {directory}")

    run()


if __name__ == "__main__":
    main()
