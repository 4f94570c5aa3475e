"""Shard loader throughput per modality (2 dataloader workers) against the rate at which the tiny
model's stage-1 training step consumes samples: the loader must not be the bottleneck.

    .venv/bin/python benchmarks/loader_throughput.py [--batches 12] [--workers 2]

Both rates are measured in this one run on this machine; only their ratio means much.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    from datamodules.prepare import prepare_nextgpt
    from datamodules.shard_datamodule import ShardDataModule
    from nextgpt.config import compose
    from nextgpt.data_source import SourceEntry
    from nextgpt.model_spec import ModelSpec
    from nextgpt.stages import Stage1EncodingAlignment
    from nextgpt.tiny import build_all
    from nextgpt.world.synthetic import write_synthetic

    cache = Path(os.environ.get("NEXTGPT_CACHE", ROOT / ".cache"))
    build_all(cache / "tiny_backbones")
    data = write_synthetic(cache / "synthetic", num_per_modality=24, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose([f"paths.root={tmp}", f"paths.cache_dir={cache}", "stage=1"], output_dir=tmp)
        model_cfg = ModelSpec.from_config(cfg.model)
        module = Stage1EncodingAlignment(
            model=model_cfg, optim=dict(cfg.stage.optim), loss=dict(cfg.stage.loss)
        )
        module.configure_model()
        opt = torch.optim.AdamW([p for p in module.model.parameters() if p.requires_grad], lr=1e-4)
        print(f"{'modality':8} {'loader samples/s':>17} {'train step samples/s':>21} {'loader / step':>14}")
        for name, root in data.items():
            src: SourceEntry = {"name": root.name, "modality": name, "root": str(root), "weight": 1}
            prepare_nextgpt(
                root, root.name, name, Path(tmp) / "shards" / root.name, sets=["pairs"], shard_size=6
            )
            dm = ShardDataModule(
                [src],
                "caption",
                model_cfg,
                batch_size=args.batch_size,
                num_workers=args.workers,
                shards_root=str(Path(tmp) / "shards"),
                shuffle=True,
            )
            dm.setup("fit")
            dm.stream.epochs = None  # endless, so the timed window never waits on an epoch boundary
            batches, n, t0 = [], 0, None
            for i, batch in enumerate(dm.train_dataloader()):
                if i == 1:  # the first batch includes worker start-up
                    t0, n = time.perf_counter(), 0
                batches.append(batch)
                n += batch["input_ids"].shape[0]
                if i == args.batches:
                    break
            loader_rate = n / (time.perf_counter() - t0)
            module.model.train()
            t1, m = time.perf_counter(), 0
            for batch in batches[1:]:
                batch.pop("stream_positions", None)
                loss = module.compute_loss(batch)["loss"]
                opt.zero_grad()
                loss.backward()
                opt.step()
                m += batch["input_ids"].shape[0]
            step_rate = m / (time.perf_counter() - t1)
            print(f"{name:8} {loader_rate:>17.1f} {step_rate:>21.1f} {loader_rate / step_rate:>14.2f}")


if __name__ == "__main__":
    main()
