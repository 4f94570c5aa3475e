"""Feature caches of a data set: ImageBind features of every item and, for every caption, its
embedding by each configured decoder's own text encoder.

    python -m nextgpt.cache dataset=cc3m paths.data_root=DIR [model=nextgpt_7b_legacy]

Runs on the training config tree, so ``dataset=``, ``model=`` and ``paths.*`` mean what they
mean for ``train.py``. Stages 1-3 find the caches by the same fingerprints and use them.
"""
from __future__ import annotations

import logging
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
    device = cfg.cache.device
    what = set(cfg.cache.what)
    encoder = load_encoder(model_cfg["encoder"]).to(device) if "media" in what else None
    conditioners = load_conditioners(model_cfg) if "captions" in what else {}
    report: dict[str, int] = {}
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

        errors = backbone_path_errors(cfg) + data_path_errors(cfg, "caption")
        if errors:
            raise ConfigError(errors)
        if cfg.model.get("build_tiny"):
            from nextgpt.tiny import build_all

            build_all(Path(cfg.paths.backbones))
        if cfg.dataset.get("synthetic"):
            from datamodules.synthetic import write_synthetic

            write_synthetic(Path(cfg.dataset.synthetic.root), num_per_modality=int(cfg.dataset.synthetic.num_per_modality),
                            seed=int(cfg.dataset.synthetic.seed))
        for directory, n in build_caches(cfg).items():
            print(f"{n:8d}  {directory}")

    run()


if __name__ == "__main__":
    main()
