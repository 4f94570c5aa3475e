"""Resident memory over a stage-2 epoch whose every caption is new (streamed from shards, so each
target is computed during training), with the bounded caption-target buffer: the process's RSS
at intervals, the embeddings held in memory, and what an unbounded per-caption dict (the old
code) would hold by the end.

    .venv/bin/python benchmarks/caption_memory.py [--captions 20000] [--batch 64]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--captions", type=int, default=20000)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    from PIL import Image

    from datamodules.shard_datamodule import ShardDataModule
    from datamodules.shard_writer import pair_record, write_shards
    from nextgpt.config import compose
    from nextgpt.model_spec import ModelSpec
    from nextgpt.stages import STAGES
    from nextgpt.tiny import build_all

    cache = Path(os.environ.get("NEXTGPT_CACHE", ROOT / ".cache"))
    build_all(cache / "tiny_backbones")
    tmp = Path(tempfile.mkdtemp())
    image = tmp / "x.png"
    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(image)
    words = "red green blue circle square triangle top left right bottom centre black white grey".split()
    rng = np.random.default_rng(0)
    records = (
        pair_record(f"c{i:06d}", "image", f"caption {i} " + " ".join(rng.choice(words, 6)), image)
        for i in range(args.captions)
    )
    write_shards(records, tmp / "shards", name="captions-pairs", shard_size=5000)
    cfg = compose([f"paths.cache_dir={cache}", "stage=2"], output_dir=str(tmp))
    model_cfg = ModelSpec.from_config(cfg.model)
    module = STAGES[2](
        model=model_cfg,
        optim=OmegaConf.to_container(cfg.stage.optim, resolve=True),
        loss=OmegaConf.to_container(cfg.stage.loss),
        cache_dir=str(tmp / "features"),
    )
    module.configure_model()
    dm = ShardDataModule(
        [{"name": "captions", "modality": "image", "shards": str(tmp / "shards")}],
        "generate",
        model_cfg,
        batch_size=args.batch,
        cache_fallback=str(tmp / "fb"),
    )
    dm.setup("fit")
    dm.open_caption_stores(module.targets, device="cpu")  # as the stage does at the start of a fit
    opt = torch.optim.AdamW([p for p in module.model.parameters() if p.requires_grad], lr=1e-4)
    shape = module.conditioners["image"].shape
    steps = -(-args.captions // args.batch)
    print(
        f"{args.captions} unique captions, batch {args.batch}, {steps} steps; target {shape[0]} x {shape[1]}"
    )
    print(f"{'step':>6} {'RSS MiB':>8} {'in memory':>10} {'on disk':>8} {'s':>6}")
    t0 = time.perf_counter()
    start = rss_mib()
    peak = start
    for step, batch in enumerate(dm.train_dataloader()):
        batch = dm.on_before_batch_transfer(batch, 0)
        loss = module.compute_loss(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        peak = max(peak, rss_mib())
        if step % max(1, steps // 8) == 0 or step == steps - 1:
            on_disk = sum(len(s) for stores in module.targets.stores.values() for s in stores)
            print(
                f"{step:6d} {rss_mib():8.0f} {module.targets.buffered:10d} {on_disk:8d} {time.perf_counter() - t0:6.1f}"
            )
    module.targets.flush()
    old = args.captions * shape[0] * shape[1] * 4 / 2**20
    print(
        f"RSS {start:.0f} MiB at the start, peak {peak:.0f} MiB (+{peak - start:.0f}); embeddings in memory at most "
        f"{module.targets.buffer_rows} ({module.targets.buffer_rows * shape[0] * shape[1] * 2 / 2**20:.1f} MiB fp16); "
        f"an unbounded dict of float32 targets would hold {old:.0f} MiB by the end"
    )


if __name__ == "__main__":
    main()
