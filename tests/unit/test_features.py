"""Feature caches: memory-mapped parts keyed by sample, fingerprinted, completed when partial."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from nextgpt.cache.encode import caption_store, imagebind_fingerprint, media_store
from nextgpt.cache.store import FeatureStore, cache_base, file_signature
from nextgpt.cli.cache import build_caches
from nextgpt.data_source import DataSource
from nextgpt.model_spec import ModelSpec


def test_store_parts_missing_failed_and_reload(tmp_path):
    store = FeatureStore.at(tmp_path, "kind", "fp")
    assert not store.exists and len(store) == 0
    store.add(["a", "b"], np.arange(6, dtype=np.float16).reshape(2, 3))
    store.add_failed({"c": "broken file"})
    assert store.missing(["a", "c", "d", "d"]) == ["d"]
    store.add(["d"], np.full((1, 3), 7, dtype=np.float16))
    again = FeatureStore(store.directory)
    assert len(again) == 3 and again.failed == {"c": "broken file"}
    np.testing.assert_array_equal(again.get("b"), [3, 4, 5])
    with pytest.raises(ValueError, match="shape"):
        again.add(["e"], np.zeros((1, 4), dtype=np.float16))
    (store.directory / "part-000009.npy").write_bytes(b"half written")  # no keys file: ignored
    assert len(FeatureStore(store.directory)) == 3


def test_cache_base_falls_back_for_read_only_data(tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    assert cache_base(data, tmp_path / "fb") == data / ".nextgpt_cache"  # next to the data when writable
    monkeypatch.setattr("nextgpt.cache.store.os.access", lambda path, mode: False)
    fallback = cache_base(data, tmp_path / "fb")
    assert fallback.parent == tmp_path / "fb" and fallback.name.startswith("data-")
    assert cache_base(data, tmp_path / "fb") == fallback  # stable: the same data finds the same cache


@pytest.fixture
def cache_cfg(tiny_cache, tmp_path):
    """The synthetic image source copied to tmp_path, so caches written beside it are private."""
    from nextgpt.config import compose

    shutil.copytree(
        tiny_cache / "synthetic" / "synthetic_image",
        tmp_path / "synthetic_image",
        ignore=shutil.ignore_patterns(".nextgpt_cache"),
    )
    cfg = compose(
        [f"paths.root={tmp_path}", f"paths.cache_dir={tiny_cache}"],
        config_name="cache",
        output_dir=str(tmp_path),
    )
    cfg.dataset.sources = [
        {"name": "synthetic_image", "modality": "image", "root": str(tmp_path / "synthetic_image")}
    ]
    cfg.cache.batch_size = 8
    return cfg


def test_build_caches_then_nothing_left_to_do(cache_cfg, tmp_path):
    report = build_caches(cache_cfg)
    n = len(json.loads((tmp_path / "synthetic_image" / "synthetic_image.json").read_text()))
    model = ModelSpec.from_config(cache_cfg.model)
    source = DataSource.of(OmegaConf.to_container(cache_cfg.dataset.sources[0]))
    media = media_store(source, model.encoder, tmp_path / "fb")
    assert media.directory.parent == tmp_path / "synthetic_image" / ".nextgpt_cache"  # next to the data
    assert len(media) == n and media.meta["shape"] == [48]
    feats = np.stack([media.get(k) for k in list(media._index)]).astype(np.float32)
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, atol=2e-3)  # fp16 rows of unit vectors
    assert report[str(media.directory)] == n
    assert build_caches(cache_cfg)[str(media.directory)] == n  # second pass: reuses, adds nothing
    assert len(list(media.directory.glob("part-*.npy"))) == 1


def test_fingerprint_follows_the_weights(tiny_cache, tmp_path):
    from nextgpt.config import compose

    model = ModelSpec.from_config(compose([f"paths.cache_dir={tiny_cache}"], output_dir=str(tmp_path)).model)
    fp = imagebind_fingerprint(model.encoder, "image")
    assert fp == imagebind_fingerprint(model.encoder, "image")
    assert fp != imagebind_fingerprint(model.encoder, "video")  # other preprocessing
    changed = tmp_path / "imagebind.pth"
    state = torch.load(model.encoder.checkpoint, weights_only=True)
    state[next(iter(state))] = state[next(iter(state))] + 1
    torch.save(state, changed)
    assert file_signature(changed) != file_signature(model.encoder.checkpoint)
    assert imagebind_fingerprint(dataclasses.replace(model.encoder, checkpoint=str(changed)), "image") != fp


def test_stage1_uses_a_partial_cache_and_decodes_the_rest(cache_cfg, tiny_config, tmp_path, caplog):
    from datamodules.json_datamodule import NextGPTDataModule
    from nextgpt.batch import Collator
    from nextgpt.stages import Stage1EncodingAlignment

    build_caches(cache_cfg)
    json_path = tmp_path / "synthetic_image" / "synthetic_image.json"
    entries = json.loads(json_path.read_text())
    extra = dict(entries[0], id="extra_1")
    shutil.copy(
        tmp_path / "synthetic_image" / "images" / entries[0]["image_name"],
        tmp_path / "synthetic_image" / "images" / "extra_1.png",
    )
    extra["image_name"] = "extra_1.png"
    json_path.write_text(json.dumps(entries + [extra]))  # the data set grew: the cache is now partial

    cfg = tiny_config("stage=1")
    model = ModelSpec.from_config(cfg.model)
    dm = NextGPTDataModule(
        sources=OmegaConf.to_container(cache_cfg.dataset.sources),
        objective="caption",
        model=model,
        batch_size=4,
        cache_fallback=str(tmp_path / "fb"),
    )
    with caplog.at_level("INFO"):
        dm.setup("fit")
    assert "partial (1 of" in caplog.text and "using ImageBind feature cache" in caplog.text
    store_dir = next((tmp_path / "synthetic_image" / ".nextgpt_cache").glob("imagebind_image-*"))
    assert not any(
        "extra_1" in p.read_text() for p in store_dir.glob("*.keys.json")
    )  # training never writes it
    extra_item = dm.train_set.conversations.index(
        next(c for c in dm.train_set.conversations if c.key == "extra_1")
    )
    decoded = Collator(dm.tokenizer.pad_token_id, 4)([dm.train_set[extra_item]])
    assert decoded["media"]["image"].shape[0] == 1 and decoded["media_features"] == {}  # not cached: decoded
    batch = next(iter(dm._loader(dm.train_set, shuffle=False)))
    assert batch["media"] == {} and batch["media_features"]["image"].shape == (4, 48)

    module = Stage1EncodingAlignment(model=model, optim=dict(cfg.stage.optim), loss=dict(cfg.stage.loss))
    module.configure_model()
    cached_loss = module.compute_loss(batch)["loss"]
    raw = NextGPTDataModule(
        sources=OmegaConf.to_container(cache_cfg.dataset.sources),
        objective="caption",
        model=model,
        batch_size=4,
        feature_cache=False,
    )
    raw.setup("fit")
    raw_batch = next(iter(raw._loader(raw.train_set, shuffle=False)))
    assert raw_batch["media_features"] == {} and raw_batch["keys"] == batch["keys"]
    module.model.eval()
    torch.testing.assert_close(
        module.compute_loss(raw_batch)["loss"], module.compute_loss(batch)["loss"], rtol=1e-3, atol=1e-3
    )  # fp16 cache rows against fresh fp32 features
    assert torch.isfinite(cached_loss)


def test_caption_store_is_created_by_stage2(cache_cfg, tiny_config, tmp_path):
    from nextgpt.cli.train import train

    cfg = tiny_config("stage=2", "trainer.max_steps=1", "init_from=null", "print_config=false")
    cfg.dataset.sources = OmegaConf.to_container(cache_cfg.dataset.sources)
    cfg.dataset.synthetic = None
    (tmp_path / "bundles" / "stage1").mkdir(parents=True)  # stage 2 needs a stage-1 bundle: use an empty one
    from safetensors.torch import save_file

    save_file(
        {"input_projector.proj.bias": torch.zeros(256)},
        str(tmp_path / "bundles" / "stage1" / "trainable.safetensors"),
    )
    train(cfg)
    model = ModelSpec.from_config(cfg.model)
    from nextgpt.model import load_conditioners

    source = DataSource.of(OmegaConf.to_container(cfg.dataset.sources[0]))
    store = caption_store(source, load_conditioners(model)["image"], tmp_path / "fb")
    captions = {
        e["caption"] for e in json.loads((tmp_path / "synthetic_image" / "synthetic_image.json").read_text())
    }
    assert store.exists and len(store) == len(captions) and store.meta["shape"] == [77, 32]


def test_damaged_media_are_recorded_not_fatal(cache_cfg, tmp_path):
    """A truncated image and a text file named like an image: counted in failed.json with the
    reason naming the file; every good item is still cached."""
    folder = tmp_path / "synthetic_image" / "images"
    entries = json.loads((tmp_path / "synthetic_image" / "synthetic_image.json").read_text())
    truncated, text = entries[0]["image_name"], entries[1]["image_name"]
    data = (folder / truncated).read_bytes()
    (folder / truncated).write_bytes(data[: len(data) // 3])
    (folder / text).write_text("this is not an image")
    build_caches(cache_cfg)
    model = ModelSpec.from_config(cache_cfg.model)
    store = media_store(
        DataSource.of(OmegaConf.to_container(cache_cfg.dataset.sources[0])), model.encoder, tmp_path / "fb"
    )
    assert set(store.failed) == {f"images/{truncated}", f"images/{text}"}
    assert truncated in store.failed[f"images/{truncated}"] and text in store.failed[f"images/{text}"]
    assert len(store) == len(entries) - 2
    assert store.missing(f"images/{e['image_name']}" for e in entries) == []  # failures are not retried
