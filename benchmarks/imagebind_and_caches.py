"""ImageBind throughput per modality (tiny and full-size, random weights, CPU) and the speed-up
that feature caches give a tiny stage-1 and stage-2 epoch, all measured in one run.

    .venv/bin/python benchmarks/imagebind_and_caches.py [--skip-huge] [--huge-items 1]

Ratios only mean something within one run of this script on one machine.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from nextgpt.encoders.imagebind import ImageBindModel
from nextgpt.encoders.imagebind_config import ImageBindConfig
from nextgpt.modality import get as modality
from nextgpt.model_spec import ModelSpec

ROOT = Path(__file__).resolve().parents[1]


def synthetic_items(cache: Path, name: str, n: int) -> list[Path]:
    folder = cache / "synthetic" / f"synthetic_{name}" / modality(name).media_folder
    return sorted(folder.iterdir())[:n]


def throughput(model: ImageBindModel, name: str, paths: list[Path]) -> tuple[float, float]:
    """(decode items/s, encode items/s) for one modality."""
    t0 = time.perf_counter()
    batch = torch.stack([modality(name).load(p) for p in paths])
    t1 = time.perf_counter()
    with torch.no_grad():
        model.encode(modality(name).encoder_modality, batch, renormalize=True)
    t2 = time.perf_counter()
    return len(paths) / (t1 - t0), len(paths) / (t2 - t1)


def epoch_time(module, loader, steps: int | None = None, no_caption_cache: bool = False) -> float:
    opt = torch.optim.AdamW([p for p in module.model.parameters() if p.requires_grad], lr=1e-4)
    module.model.train()
    t0 = time.perf_counter()
    for i, batch in enumerate(loader):
        if no_caption_cache:  # recompute every target with the decoder's text encoder
            module.targets.pending.clear()
            module.targets.stores = {}
        loss = module.compute_loss(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        if steps and i + 1 >= steps:
            break
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-huge", action="store_true")
    ap.add_argument("--huge-items", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    from nextgpt.tiny import build_all
    from nextgpt.world.synthetic import write_synthetic

    cache = Path(os.environ.get("NEXTGPT_CACHE", ROOT / ".cache"))
    build_all(cache / "tiny_backbones")
    write_synthetic(cache / "synthetic", num_per_modality=24, seed=0)

    print(f"torch threads: {torch.get_num_threads()}")
    print(f"{'model':6} {'modality':8} {'items':>5} {'decode items/s':>15} {'encode items/s':>15}")
    configs = [("tiny", ImageBindConfig.tiny(), 8)]
    if not args.skip_huge:
        configs.append(("huge", ImageBindConfig.huge(), args.huge_items))
    for label, arch, n in configs:
        torch.manual_seed(0)
        model = ImageBindModel(arch).eval()
        for name in ("image", "audio", "video"):
            dec, enc = throughput(model, name, synthetic_items(cache, name, n))
            print(f"{label:6} {name:8} {n:>5} {dec:>15.2f} {enc:>15.2f}")
        del model

    # tiny stage-1 / stage-2 epochs with and without the caches, on a private copy of the data
    from datamodules.json_datamodule import NextGPTDataModule
    from nextgpt.cli.cache import build_caches
    from nextgpt.config import compose
    from nextgpt.stages import Stage1EncodingAlignment, Stage2DecodingAlignment

    with tempfile.TemporaryDirectory() as tmp:
        import shutil

        shutil.copytree(
            cache / "synthetic", Path(tmp) / "synthetic", ignore=shutil.ignore_patterns(".nextgpt_cache")
        )
        overrides = [f"paths.root={tmp}", f"paths.cache_dir={cache}", f"paths.synthetic_root={tmp}/synthetic"]
        cache_cfg = compose(overrides, config_name="cache", output_dir=tmp)
        t0 = time.perf_counter()
        build_caches(cache_cfg)
        build_s = time.perf_counter() - t0
        results = {}
        for stage, cls, objective in (
            (1, Stage1EncodingAlignment, "caption"),
            (2, Stage2DecodingAlignment, "generate"),
        ):
            cfg = compose([*overrides, f"stage={stage}"], output_dir=tmp)
            model_cfg = ModelSpec.from_config(cfg.model)
            sources = OmegaConf.to_container(cfg.dataset.sources, resolve=True)
            module = cls(model=model_cfg, optim=dict(cfg.stage.optim), loss=dict(cfg.stage.loss))
            module.configure_model()
            times = {}
            for use_cache in (False, True):
                dm = NextGPTDataModule(
                    sources=sources,
                    objective=objective,
                    model=model_cfg,
                    batch_size=8,
                    feature_cache=use_cache,
                    cache_fallback=str(Path(tmp) / "fb"),
                )
                dm.setup("fit")
                if stage == 2 and use_cache:
                    dm.open_caption_stores(module.targets, device=module.device)
                loader = dm._loader(dm.train_set, shuffle=False)
                times[use_cache] = epoch_time(module, loader, no_caption_cache=(stage == 2 and not use_cache))
            results[stage] = times
            print(
                f"stage {stage} tiny epoch ({len(dm.train_set)} samples): without cache {times[False]:.2f} s, "
                f"with cache {times[True]:.2f} s, speed-up x{times[False] / times[True]:.2f}"
            )
        print(f"building all caches of the synthetic set (72 media, 54 captions) took {build_s:.2f} s")


if __name__ == "__main__":
    main()
