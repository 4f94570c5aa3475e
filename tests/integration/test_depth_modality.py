"""A modality added as a plugin: depth maps (``nextgpt/modalities/depth.py``, input-only, through
ImageBind's depth trunk) train stage 1 from ``configs/dataset/depth.yaml`` by command-line
overrides alone, with no file that names another modality changed for it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from nextgpt.model_spec import ModelSpec
from tests.cli import bundle_meta, train

pytestmark = pytest.mark.slow

DEPTH_MODEL = "+model.modalities.depth={num_signal_tokens: 0, decoder: null}"
QUIET = ["logger=csv", "callbacks.generation_samples=null", "stage.batch_size=4"]


def write_depth_set(root: Path, n: int = 12) -> list[str]:
    """``n`` 16-bit depth PNGs (millimetres) of a wall near or far, flat or sloping, with captions
    that say which, in the NExT-GPT pair layout (``depth.json``)."""
    folder = root / "depth" / "depths"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    entries, captions = [], []
    for i in range(n):
        near, slope = i % 2 == 0, (i // 2) % 2 == 1
        base = 800.0 if near else 4000.0
        ramp = np.linspace(0, 1500 if slope else 0, 64)[None, :].repeat(48, axis=0)
        depth = (base + ramp + rng.normal(0, 5, (48, 64))).astype(np.uint16)
        Image.fromarray(depth).save(folder / f"d{i:03d}.png")
        caption = f"a {'near' if near else 'far'} wall {'sloping away to the right' if slope else 'facing the camera'}"
        entries.append({"depth_name": f"d{i:03d}.png", "caption": caption})
        captions.append(caption)
    (root / "depth" / "depth.json").write_text(json.dumps(entries))
    return captions


def test_stage1_trains_on_depth_maps_through_the_depth_trunk(tmp_path, tiny_cache):
    write_depth_set(tmp_path / "data")
    res = train(
        tmp_path,
        tiny_cache,
        "stage=1",
        "dataset=depth",
        f"paths.data_root={tmp_path / 'data'}",
        DEPTH_MODEL,
        "trainer.max_steps=3",
        *QUIET,
    )
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    assert "3 trained in this run" in out
    meta = bundle_meta(tmp_path, 1)
    assert meta["global_step"] == 3
    # the token layout has the depth markers and no depth signal tokens; nothing decodes depth
    flat = json.dumps(meta["token_layout"])
    assert "<Dep>" in flat and "</Dep>" in flat and "[DEP0]" not in flat
    trained = load_file(str(tmp_path / "bundles" / "stage1" / "trainable.safetensors"))
    assert any(k.startswith("input_projector.") for k in trained)
    assert not any("depth" in k for k in trained if k.startswith("output_projectors."))


def test_the_model_encodes_depth_with_the_depth_trunk_and_generates_nothing_for_it(tmp_path, tiny_cache):
    from nextgpt.config import compose
    from nextgpt.encoders.preprocess import load_depth
    from nextgpt.model import build_nextgpt
    from nextgpt.tiny import build_all

    build_all(tiny_cache / "tiny_backbones")  # the fixture built them: this only checks they are there
    cfg = compose(
        ["stage=1", DEPTH_MODEL, f"paths.cache_dir={tiny_cache}", f"paths.root={tmp_path}"],
        output_dir=str(tmp_path),
    )

    model_cfg = ModelSpec.from_config(cfg.model)
    model, tokenizer, conditioners = build_nextgpt(model_cfg)
    assert "depth" in model.encoder.modality_trunks and "depth" not in conditioners
    assert "depth" not in model.output_projectors
    write_depth_set(tmp_path / "data", n=2)
    x = torch.stack([load_depth(p) for p in sorted((tmp_path / "data" / "depth" / "depths").glob("*.png"))])
    projected = model.encode_media({"depth": x}, every_modality=True)
    assert projected["depth"].shape == (
        2,
        model_cfg.input_projector.num_tokens,
        model.llm.config.hidden_size,
    )
    assert set(model.modality_names) == {"image", "audio", "video"}  # zero-row runs: the generated ones
    feats = model.encoder.encode("depth", x, renormalize=True)
    assert torch.allclose(feats.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_the_cache_pass_encodes_depth_with_the_depth_trunk(tmp_path, tiny_cache):
    """`python -m nextgpt.cache dataset=depth ...` builds the trunk its data needs (the encoder's
    arch lists vision and audio only) and caches every depth map."""
    from nextgpt.cli.cache import build_caches
    from nextgpt.config import compose

    write_depth_set(tmp_path / "data", n=3)
    cfg = compose(
        [
            "dataset=depth",
            f"paths.data_root={tmp_path / 'data'}",
            f"paths.cache_dir={tiny_cache}",
            f"paths.root={tmp_path}",
            DEPTH_MODEL,
            "cache.what=[media]",
        ],
        config_name="cache",
        output_dir=str(tmp_path),
    )
    report = build_caches(cfg)
    (store,) = [d for d in report if "imagebind_depth" in d]
    assert report[store] == 3
