"""Feature caches of a data set: ImageBind features of every item and, for every caption, its
embedding by each configured decoder's own text encoder.

    python -m nextgpt.cache dataset=cc3m paths.data_root=DIR [model=nextgpt_7b_legacy]
    torchrun --nproc-per-node 8 -m nextgpt.cache dataset=webvid cache.device=cuda

Runs on the training config tree, so ``dataset=``, ``model=`` and ``paths.*`` mean what they
mean for ``train.py``. Stages 1-3 find the caches by the same fingerprints and use them.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import cast

import hydra
from omegaconf import DictConfig, OmegaConf

from datamodules.caches import ShardPass, build_shard_caches, source_contents
from datamodules.json_datamodule import json_path_errors
from datamodules.shard_datamodule import shard_path_errors
from nextgpt.cache.encode import caption_store, compute_captions, compute_media, media_store
from nextgpt.config import CONFIG_DIR, ConfigError, main_guard, normalize_overrides, register_resolvers
from nextgpt.data_source import SourceEntry, data_sources
from nextgpt.model import load_conditioners, load_encoder
from nextgpt.model_spec import ModelSpec
from nextgpt.preflight import backbone_path_errors

log = logging.getLogger(__name__)


def data_path_errors(cfg: DictConfig, objective: str) -> list[str]:
    """What ``cfg.dataset``'s sources lack for ``objective``, checked as its reader checks them
    (``dataset.loader``: json or shards)."""
    name = str(cfg.dataset.name)
    sources = data_sources(cast(list[SourceEntry], OmegaConf.to_container(cfg.dataset.sources, resolve=True)))
    if cfg.dataset.get("loader", "json") == "shards":
        changed = str(cfg.dataset.get("source_changed", "rewrite"))
        return shard_path_errors(name, sources, objective, str(cfg.paths.shards), changed)
    return json_path_errors(name, sources, objective)


def build_caches(cfg) -> dict[str, int]:
    """The ``python -m nextgpt.cache`` pass over every source of ``cfg.dataset``."""
    model = ModelSpec.from_config(cfg.model)
    fallback = Path(cfg.paths.cache_dir) / "features"
    rank, world = (
        int(os.environ.get("RANK", 0)),
        int(os.environ.get("WORLD_SIZE", 1)),
    )  # torchrun -m nextgpt.cache
    device = cfg.cache.device
    if device == "cuda" and world > 1:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    what = set(cfg.cache.what)
    # the trunks of the modalities this pass encodes (a depth data set needs ImageBind's depth branch)
    modalities = {str(s.modality) for s in cfg.dataset.sources}
    encoder = load_encoder(model.encoder, modalities).to(device) if "media" in what else None
    conditioners = load_conditioners(model) if "captions" in what else {}
    report: dict[str, int] = {}
    if cfg.dataset.get("loader", "json") == "shards":
        return build_shard_caches(
            shard_pass(cfg), model, encoder, conditioners, fallback, rank, world, device
        )
    for source in data_sources(
        cast(list[SourceEntry], OmegaConf.to_container(cfg.dataset.sources, resolve=True))
    ):
        media, captions = source_contents(source)
        if encoder is not None:
            store = media_store(source, model.encoder, fallback)
            added = compute_media(
                store,
                media,
                encoder,
                source.modality,
                batch_size=int(cfg.cache.batch_size),
                dtype=cfg.cache.dtype,
            )
            report[str(store.directory)] = len(store)
            log.info(
                "%s: %d ImageBind features (%d new, %d failed) in %s",
                source.name,
                len(store),
                added,
                len(store.failed),
                store.directory,
            )
        conditioner = conditioners.get(source.modality)
        if conditioner is not None:
            store = caption_store(source, conditioner.to(device), fallback)
            added = compute_captions(store, captions, conditioner, dtype=cfg.cache.dtype)
            report[str(store.directory)] = len(store)
            log.info(
                "%s: %d caption embeddings (%d new) in %s", source.name, len(store), added, store.directory
            )
    return report


def shard_pass(cfg) -> ShardPass:
    """What the shard-side pass (:func:`datamodules.caches.build_shard_caches`) reads of ``cfg``."""
    return ShardPass(
        sources=tuple(
            data_sources(cast(list[SourceEntry], OmegaConf.to_container(cfg.dataset.sources, resolve=True)))
        ),
        shards_root=str(cfg.paths.shards),
        shard_size=int(cfg.dataset.get("shard_size", 1000)),
        source_changed=str(cfg.dataset.get("source_changed", "rewrite")),
        batch_size=int(cfg.cache.batch_size),
        dtype=str(cfg.cache.dtype),
    )


def main() -> None:
    register_resolvers()
    sys.argv = [sys.argv[0], *normalize_overrides(sys.argv[1:])]
    config_dir = str(CONFIG_DIR)

    @hydra.main(config_path=config_dir, config_name="cache", version_base="1.3")
    @main_guard
    def run(cfg) -> None:
        model = ModelSpec.from_config(cfg.model)
        hydra.utils.instantiate(cfg.model.get("backbones"))  # model.backbones: tiny/world models build theirs
        if cfg.dataset.get("synthetic"):  # generated data: written first, then checked like any other
            from nextgpt.world import synthetic  # deferred: nextgpt.world stays off the real-weights path

            synthetic.write_synthetic(
                Path(cfg.dataset.synthetic.root),
                num_per_modality=int(cfg.dataset.synthetic.num_per_modality),
                seed=int(cfg.dataset.synthetic.seed),
            )
        errors = backbone_path_errors(model) + data_path_errors(cfg, "caption")
        if errors:
            raise ConfigError(errors)
        for directory, n in build_caches(cfg).items():
            print(f"{n:8d}  {directory}")

    run()


if __name__ == "__main__":
    main()
