"""Stage 2 with the image decoder switched to Stable Diffusion 2 and to SDXL: one multirun trains
stage 1 and 2 of each (the alignment and the denoising loss), and each stage-2 bundle decodes an image."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from tests.cli import train

pytestmark = pytest.mark.slow

# the two overrides of each decoder (README "Stable Diffusion 2.x and SDXL"), paired by a config
# group of this test's own: a multirun over one group option sets both keys of a decoder
DECODERS = {
    "sd2": {"path": "${paths.backbones}/sd2", "conditioning": "last_hidden_state"},
    "sdxl": {"path": "${paths.backbones}/sdxl", "conditioning": "sdxl"},
}


def test_stage2_trains_and_decodes_with_sd2_and_sdxl(tiny_cache, tmp_path):
    from nextgpt.generate import Generator

    group = tmp_path / "configs" / "image_decoder"
    group.mkdir(parents=True)
    for name, keys in DECODERS.items():
        (group / f"{name}.yaml").write_text(
            "# @package model.modalities.image.decoder\n" + OmegaConf.to_yaml(keys)
        )
    res = train(
        tmp_path,
        tiny_cache,
        "-m",
        "stage=1,2",
        "+image_decoder=sd2,sdxl",
        f"hydra.searchpath=[file://{tmp_path / 'configs'}]",
        "++stage.loss.denoise=1.0",
        "model.modalities.video.decoder.denoise=false",
        "model.modalities.audio.decoder.denoise=false",
        "stage.batch_size=4",
        "trainer.max_steps=2",
        "trainer.log_every_n_steps=1",
        "logger=csv",
        "callbacks.generation_samples=null",
    )
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    assert out.count("stage 2: denoising loss on for ['image'] (weight 1.0)") == 2
    jobs = {}
    for overrides in (tmp_path / "logs").rglob("*_stage2/.hydra/overrides.yaml"):
        name = next(o.split("=")[1] for o in OmegaConf.load(overrides) if o.startswith("+image_decoder="))
        jobs[name] = overrides.parents[1]
    assert sorted(jobs) == ["sd2", "sdxl"]
    for name, job in jobs.items():
        rows = list(csv.DictReader(open(next(job.rglob("metrics.csv")))))
        logged = {
            k: float(r[k]) for r in rows for k in ("train/align", "train/denoise", "train/loss") if r.get(k)
        }
        assert set(logged) == {"train/align", "train/denoise", "train/loss"}, (name, rows)
        assert all(math.isfinite(v) for v in logged.values()) and logged["train/denoise"] > 0, (name, logged)

        bundle = tmp_path / "bundles" / f"+image_decoder={name}" / "stage2"
        gen = Generator(bundle)
        decoder = gen.decoder("image")
        assert decoder.path.endswith(f"tiny_backbones/{name}")
        assert decoder.conditioning == DECODERS[name]["conditioning"]
        feed = list(gen.model.layout.signal_ids["image"])
        width = gen.model.llm.config.get_text_config().hidden_size
        hidden = torch.randn(len(feed), width, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            image = gen.decode_group("image", hidden, feed, seed=1)
        assert (
            image.shape == (decoder.generate["height"], decoder.generate["width"], 3)
            and np.isfinite(image).all()
        )
