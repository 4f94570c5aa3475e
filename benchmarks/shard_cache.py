"""Feature caches on the shard path, measured in one run on this machine:

- the loader's samples/s per dataloader worker, cached and uncached, per modality, and how many
  workers feed one GPU at the 233 samples/s a 7B stage-1 step consumes (issue 12's anchor);
- a tiny stage-1 epoch from shards with and without the cache;
- the full-size ImageBind towers' encode cost per item on this CPU (random weights), so the
  cached / uncached cost per item at full size comes from measured parts.

    .venv/bin/python benchmarks/shard_cache.py [--per-modality 48] [--skip-huge]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from itertools import islice
from pathlib import Path

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
GPU_STEP_SAMPLES_PER_S = 233  # a 7B stage-1 step's consumption per GPU (H100, issue 12)


def loader_rate(dm, batches: int) -> float:
    """Samples/s of the train loader (one worker), after its first batch (worker start-up)."""
    it = iter(dm.train_dataloader())
    next(it)
    t0, n = time.perf_counter(), 0
    for batch in islice(it, batches):
        n += len(batch["keys"])
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--per-modality", type=int, default=48)
    ap.add_argument("--skip-huge", action="store_true")
    args = ap.parse_args()
    from datamodules.caches import compute_shard_media
    from datamodules.prepare import prepare_nextgpt
    from datamodules.shard_datamodule import ShardDataModule
    from nextgpt.cache.encode import shard_media_store
    from nextgpt.config import compose
    from nextgpt.encoders.imagebind import ImageBindModel
    from nextgpt.encoders.imagebind_config import ImageBindConfig
    from nextgpt.modality import get as modality
    from nextgpt.model import load_encoder
    from nextgpt.model_spec import ModelSpec
    from nextgpt.stages import STAGES
    from nextgpt.tiny import build_all
    from nextgpt.world.synthetic import write_synthetic

    cache = Path(os.environ.get("NEXTGPT_CACHE", ROOT / ".cache"))
    build_all(cache / "tiny_backbones")
    tmp = Path(tempfile.mkdtemp())
    syn = tmp / "synthetic"
    write_synthetic(syn, num_per_modality=args.per_modality, seed=1)
    cfg = compose([f"paths.cache_dir={cache}"], output_dir=str(tmp))
    model_cfg = ModelSpec.from_config(cfg.model)
    encoder = load_encoder(model_cfg.encoder)
    print(
        f"{os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}, {args.per_modality} items a modality"
    )
    print(
        f"{'modality':8} {'uncached samples/s/worker':>26} {'cached':>8} "
        f"{'workers for 233/s: uncached':>28} {'cached':>7}"
    )
    rates = {}
    for name in ("image", "audio", "video"):
        src = syn / f"synthetic_{name}"
        shards = tmp / "shards" / name
        prepare_nextgpt(src, src.name, name, shards, sets=["pairs"])
        store = shard_media_store(shards, name, "pairs", model_cfg.encoder, tmp / "fb")
        compute_shard_media(store, sorted(shards.glob("*.tar")), name, encoder, batch_size=16)
        for cached in (False, True):
            dm = ShardDataModule(
                [{"name": src.name, "modality": name, "shards": str(shards)}],
                "caption",
                model_cfg,
                batch_size=8,
                num_workers=1,
                shuffle=True,
                feature_cache=cached,
                cache_fallback=str(tmp / "fb"),
            )
            dm.setup("fit")
            rates[(name, cached)] = loader_rate(dm, batches=max(2, args.per_modality // 8 - 2))
        u, c = rates[(name, False)], rates[(name, True)]
        print(
            f"{name:8} {u:26.1f} {c:8.1f} {GPU_STEP_SAMPLES_PER_S / u:28.1f} {GPU_STEP_SAMPLES_PER_S / c:7.2f}"
        )

    # a tiny stage-1 epoch from the image shards: loader + forward + backward + step
    module = STAGES[1](
        model=model_cfg,
        optim=OmegaConf.to_container(cfg.stage.optim, resolve=True),
        loss=OmegaConf.to_container(cfg.stage.loss),
    )
    module.configure_model()
    opt = torch.optim.AdamW([p for p in module.model.parameters() if p.requires_grad], lr=1e-4)
    for name in ("image", "video"):
        epoch = {}
        for cached in (False, True):
            dm = ShardDataModule(
                [{"name": f"synthetic_{name}", "modality": name, "shards": str(tmp / "shards" / name)}],
                "caption",
                model_cfg,
                batch_size=8,
                num_workers=0,
                feature_cache=cached,
                cache_fallback=str(tmp / "fb"),
            )
            dm.setup("fit")
            t0 = time.perf_counter()
            for batch in dm.train_dataloader():
                batch = dm.on_before_batch_transfer(batch, 0)
                loss = module.compute_loss(batch)["loss"]
                opt.zero_grad()
                loss.backward()
                opt.step()
            epoch[cached] = time.perf_counter() - t0
        print(
            f"tiny stage-1 epoch on {args.per_modality} {name} items from shards: uncached {epoch[False]:.2f} s, "
            f"cached {epoch[True]:.2f} s (x{epoch[False] / epoch[True]:.1f})"
        )

    if args.skip_huge:
        return
    # full size: what the cache saves per item = decode + ImageBind-huge encode, against a cache read
    torch.manual_seed(0)
    huge = ImageBindModel(ImageBindConfig.huge()).eval()
    print("full-size ImageBind on this CPU (random weights), one item each:")
    for name in ("image", "audio", "video"):
        item = sorted((syn / f"synthetic_{name}" / modality(name).media_folder).iterdir())[0]
        t0 = time.perf_counter()
        x = modality(name).load(item)[None]
        t1 = time.perf_counter()
        with torch.no_grad():
            huge.encode(modality(name).encoder_modality, x, renormalize=True)
        t2 = time.perf_counter()
        cached_cost = 1.0 / rates[(name, True)]
        print(
            f"  {name:6} decode {t1 - t0:6.3f} s + encode {t2 - t1:7.2f} s = {t2 - t0:7.2f} s an item uncached; "
            f"cached {cached_cost * 1000:.2f} ms an item: x{(t2 - t0) / cached_cost:,.0f}"
        )


if __name__ == "__main__":
    main()
