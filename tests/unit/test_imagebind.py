"""ImageBind encoder: shapes and norms, checkpoint round trip, loader errors, the huge key set."""

from __future__ import annotations

import math

import pytest
import torch

from nextgpt.encoders.imagebind import (
    ImageBindCheckpointError,
    ImageBindModel,
    load_imagebind,
)
from nextgpt.encoders.imagebind_config import ImageBindConfig
from nextgpt.model_spec import ModelSpec

AUDIO_LOGIT_SCALE = 20.0  # the audio postprocessor's fixed logit scale in Meta's model


@pytest.fixture(scope="module")
def tiny() -> ImageBindModel:
    torch.manual_seed(0)
    return ImageBindModel(ImageBindConfig.tiny()).eval()


def _inputs(cfg: ImageBindConfig, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    s = cfg.image_size
    return {
        "image": torch.randn(2, 3, s, s, generator=g),
        "video": torch.randn(2, 3, 3, 2, s, s, generator=g),  # (B, clips*crops, C, T, H, W)
        "audio": torch.randn(2, 3, 1, cfg.audio_num_mel_bins, cfg.audio_target_len, generator=g),
    }


def _encode_all(model: ImageBindModel, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {
            "image": model.encode("vision", x["image"]),
            "video": model.encode("vision", x["video"]),
            "audio": model.encode("audio", x["audio"]),
        }


def test_tiny_shapes_and_norms(tiny: ImageBindModel) -> None:
    cfg = tiny.cfg
    x = _inputs(cfg)
    out = _encode_all(tiny, x)
    for name, emb in out.items():
        assert emb.shape == (2, tiny.embed_dim) == (2, cfg.out_embed_dim), name
        assert torch.isfinite(emb).all(), name
    # an image is one L2-normalised vector
    torch.testing.assert_close(out["image"].norm(dim=-1), torch.ones(2), atol=1e-5, rtol=0)
    # clips: mean of per-clip normalised vectors (audio scaled by 20), not renormalised - the original forward
    with torch.no_grad():
        per_clip = torch.stack(
            [tiny.encode("vision", x["video"][:, i : i + 1]) for i in range(x["video"].shape[1])], 1
        )
        torch.testing.assert_close(per_clip.norm(dim=-1), torch.ones(2, 3), atol=1e-5, rtol=0)
        torch.testing.assert_close(out["video"], per_clip.mean(1), atol=1e-6, rtol=1e-5)
        per_clip_audio = torch.stack([tiny.encode("audio", x["audio"][:, i : i + 1]) for i in range(3)], 1)
        torch.testing.assert_close(
            per_clip_audio.norm(dim=-1), torch.full((2, 3), AUDIO_LOGIT_SCALE), atol=1e-4, rtol=0
        )
        torch.testing.assert_close(out["audio"], per_clip_audio.mean(1), atol=1e-5, rtol=1e-5)
    assert (out["video"].norm(dim=-1) <= 1 + 1e-5).all()
    assert (out["audio"].norm(dim=-1) <= AUDIO_LOGIT_SCALE + 1e-4).all()
    # renormalize=True gives unit vectors for every input kind
    with torch.no_grad():
        for mod, key in (("vision", "image"), ("vision", "video"), ("audio", "audio")):
            n = tiny.encode(mod, x[key], renormalize=True).norm(dim=-1)
            torch.testing.assert_close(n, torch.ones(2), atol=1e-5, rtol=0)
    # batch items are independent
    with torch.no_grad():
        torch.testing.assert_close(
            tiny.encode("vision", x["image"][1:]), out["image"][1:], atol=1e-6, rtol=1e-5
        )


def test_image_is_a_repeated_two_frame_clip(tiny: ImageBindModel) -> None:
    """PadIm2Video: an image equals the same image given as a 2-frame video (one clip)."""
    img = _inputs(tiny.cfg)["image"]
    with torch.no_grad():
        a = tiny.encode("vision", img)
        b = tiny.encode("vision", img[:, None, :, None].repeat(1, 1, 1, 2, 1, 1))
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_bad_inputs_are_rejected(tiny: ImageBindModel) -> None:
    with pytest.raises(ValueError, match="modality"):
        tiny.encode("text", torch.zeros(1, 3, 224, 224))
    with pytest.raises(ValueError, match="vision input"):
        tiny.encode("vision", torch.zeros(1, 3, 112, 112))
    with pytest.raises(ValueError, match="audio input"):
        tiny.encode("audio", torch.zeros(1, 3, 1, 128, 100))


def test_config_from_dict() -> None:
    assert ImageBindConfig.from_dict({"preset": "huge"}) == ImageBindConfig.huge()
    c = ImageBindConfig.from_dict(
        {"preset": "tiny", "vision_num_blocks": 3, "vision_kernel_size": [2, 16, 16]}
    )
    assert c.vision_num_blocks == 3 and c.vision_kernel_size == (2, 16, 16)
    full = {f: getattr(ImageBindConfig.tiny(), f) for f in ImageBindConfig.__dataclass_fields__}
    assert ImageBindConfig.from_dict(full) == ImageBindConfig.tiny()
    with pytest.raises(ValueError, match="vision_width"):
        ImageBindConfig.from_dict({"preset": "tiny", "vision_width": 3})
    with pytest.raises(ValueError, match="preset"):
        ImageBindConfig.from_dict({"preset": "giant"})
    with pytest.raises(ValueError, match="audio_embed_dim"):
        ImageBindConfig.from_dict({k: v for k, v in full.items() if k != "audio_embed_dim"})
    with pytest.raises(ValueError, match="divisible"):
        ImageBindConfig.from_dict({"preset": "tiny", "vision_num_heads": 5})


def test_round_trip_is_bit_identical(tiny: ImageBindModel, tmp_path) -> None:
    path = tmp_path / "imagebind_tiny.pth"
    torch.save(tiny.state_dict(), path)
    loaded = load_imagebind(path, tiny.cfg)
    assert not loaded.training
    assert all(not p.requires_grad for p in loaded.parameters())
    x = _inputs(tiny.cfg, seed=3)
    a, b = _encode_all(tiny, x), _encode_all(loaded, x)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    half = load_imagebind(path, tiny.cfg, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())


def test_other_modalities_are_ignored(tiny: ImageBindModel, tmp_path) -> None:
    sd = dict(tiny.state_dict())
    sd["modality_trunks.text.blocks.0.attn.in_proj_weight"] = torch.zeros(6, 2)
    sd["modality_postprocessors.depth.1.log_logit_scale"] = torch.tensor(1.0)
    path = tmp_path / "with_text.pth"
    torch.save(sd, path)
    load_imagebind(path, tiny.cfg)


def test_loader_errors(tiny: ImageBindModel, tmp_path) -> None:
    cfg = tiny.cfg
    missing = tmp_path / "nope.pth"
    with pytest.raises(ImageBindCheckpointError, match="nope.pth"):
        load_imagebind(missing, cfg)

    good = tmp_path / "good.pth"
    torch.save(tiny.state_dict(), good)
    truncated = tmp_path / "truncated.pth"
    data = good.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageBindCheckpointError) as e:
        load_imagebind(truncated, cfg)
    assert str(truncated) in str(e.value)

    sd = dict(tiny.state_dict())
    gone = "modality_trunks.audio.blocks.1.attn.bias_k"
    del sd[gone]
    one_missing = tmp_path / "one_missing.pth"
    torch.save(sd, one_missing)
    with pytest.raises(ImageBindCheckpointError) as e:
        load_imagebind(one_missing, cfg)
    assert str(one_missing) in str(e.value) and gone in str(e.value)

    wider = ImageBindConfig.from_dict({"preset": "tiny", "vision_embed_dim": 64, "audio_embed_dim": 48})
    with pytest.raises(ImageBindCheckpointError) as e:
        load_imagebind(good, wider)
    msg = str(e.value)
    assert str(good) in msg and "modality_preprocessors.audio.cls_token" in msg and "(1, 1, 32)" in msg

    deeper = ImageBindConfig.from_dict({"preset": "tiny", "audio_num_blocks": 3})
    with pytest.raises(ImageBindCheckpointError, match="blocks.2"):
        load_imagebind(good, deeper)

    no_ours = tmp_path / "text_only.pth"
    torch.save({"modality_trunks.text.blocks.0.norm_1.weight": torch.ones(3)}, no_ours)
    with pytest.raises(ImageBindCheckpointError, match="no vision/audio keys"):
        load_imagebind(no_ours, cfg)


# Shapes from Meta's imagebind_huge.pth (vision ViT-H/14, audio ViT-B, 1024-d heads).
HUGE_KEYS = {
    "modality_preprocessors.vision.rgbt_stem.proj.1.weight": (1280, 3, 2, 14, 14),
    "modality_preprocessors.vision.cls_token": (1, 1, 1280),
    "modality_preprocessors.vision.pos_embedding_helper.pos_embed": (1, 257, 1280),
    "modality_trunks.vision.pre_transformer_layer.0.weight": (1280,),
    "modality_trunks.vision.blocks.0.attn.in_proj_weight": (3840, 1280),
    "modality_trunks.vision.blocks.31.mlp.fc1.weight": (5120, 1280),
    "modality_heads.vision.0.weight": (1280,),
    "modality_heads.vision.2.weight": (1024, 1280),
    "modality_preprocessors.audio.rgbt_stem.proj.weight": (768, 1, 16, 16),
    "modality_preprocessors.audio.rgbt_stem.norm_layer.weight": (768,),
    "modality_preprocessors.audio.pos_embedding_helper.pos_embed": (1, 229, 768),
    "modality_trunks.audio.blocks.11.attn.bias_k": (1, 1, 768),
    "modality_trunks.audio.blocks.0.attn.out_proj.weight": (768, 768),
    "modality_heads.audio.2.weight": (1024, 768),
    "modality_postprocessors.audio.1.log_logit_scale": (),
}


def test_huge_key_set() -> None:
    with torch.device("meta"):
        model = ImageBindModel(ImageBindConfig.huge())
    sd = model.state_dict()
    # 569 = the vision+audio subset of Meta's imagebind_huge state dict (checked against the original code)
    assert len(sd) == 569
    for k, shape in HUGE_KEYS.items():
        assert tuple(sd[k].shape) == shape, k
    assert not any(k.startswith("modality_trunks.audio.pre_transformer_layer.0") for k in sd)  # vision only
    assert not any(k.startswith("modality_trunks.vision") and "bias_k" in k for k in sd)  # audio only
    n_params = sum(p.numel() for p in model.parameters())
    assert 7.0e8 < n_params < 7.4e8  # ViT-H/14 (~631M) + ViT-B audio (~86M) = 719,065,088
    assert model.embed_dim == 1024
    assert math.prod(ImageBindConfig.huge().audio_patch_layout) + 1 == 229


def test_the_original_feeds_its_projector_unrenormalised_features(tiny_cache, tmp_path) -> None:
    """``experiment=nextgpt_legacy`` sets ``model.encoder.renormalize=false``: the input projector gets
    ImageBind's postprocessed output as the original's ``llama_proj`` did (audio at norm 20, video the
    mean of unit clip vectors); the default gets unit vectors. The feature caches key on it."""

    from nextgpt.cache.encode import imagebind_fingerprint
    from nextgpt.config import compose
    from nextgpt.model import build_nextgpt

    seen = {}
    for renormalize, overrides in ((False, ["experiment=nextgpt_legacy"]), (True, [])):
        cfg = compose(
            [*overrides, "model=tiny", f"paths.root={tmp_path}", f"paths.cache_dir={tiny_cache}"],
            output_dir=str(tmp_path),
        )
        model_cfg = ModelSpec.from_config(cfg.model)
        assert model_cfg.encoder.renormalize is renormalize
        model, _, _ = build_nextgpt(model_cfg)
        fed = {}
        hook = model.input_projector.register_forward_pre_hook(
            lambda _, args, fed=fed: fed.setdefault("x", args[0])
        )
        x = _inputs(model.encoder.cfg)["audio"][:, :1]  # one clip per item
        with torch.no_grad():
            model.encode_media({"audio": x})
        hook.remove()
        norms = fed["x"].norm(dim=-1)
        want = 1.0 if renormalize else AUDIO_LOGIT_SCALE
        torch.testing.assert_close(norms, torch.full_like(norms, want), atol=1e-4, rtol=0)
        seen[renormalize] = imagebind_fingerprint(model_cfg.encoder, "audio")
    assert seen[True] != seen[False]
