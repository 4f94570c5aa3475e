"""ImageBind's depth branch: Meta's huge key set, the tiny forward against a direct computation,
depth-map preprocessing, and checkpoints with (and without) depth weights."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from nextgpt import modality as modality_registry
from nextgpt.encoders.imagebind import (
    ImageBindCheckpointError,
    ImageBindModel,
    load_imagebind,
)
from nextgpt.encoders.imagebind_config import ImageBindConfig
from nextgpt.encoders.preprocess import (
    DEPTH_MEAN,
    DEPTH_STD,
    KINECT_BASELINE,
    KINECT_FOCAL_LENGTH,
    MediaDecodeError,
    load_depth,
)

DEPTH_LOGIT_SCALE = 5.0  # LearnableLogitScaling(logit_scale_init=5.0, learnable=False) in Meta's model
WITH_DEPTH = ("vision", "audio", "depth")


def _tiny_depth_cfg() -> ImageBindConfig:
    return ImageBindConfig.from_dict({"preset": "tiny", "modalities": list(WITH_DEPTH)})


@pytest.fixture(scope="module")
def tiny_depth() -> ImageBindModel:
    torch.manual_seed(0)
    return ImageBindModel(_tiny_depth_cfg()).eval()


# ---------------------------------------------------------------------------------------------
# (a) the huge key set, written out from Meta's imagebind_model.py / multimodal_preprocessors.py
# ---------------------------------------------------------------------------------------------
# Meta's depth branch: RGBDTPreprocessor(rgbt_stem=None, depth_stem=PatchEmbedGeneric([Conv2d(1, 384,
# kernel 16, stride 16, bias=False)], norm_layer=LayerNorm(384))), img_size [1, 224, 224] -> 14x14
# patches + 1 cls token; SimpleTransformer(384, 12 blocks, MultiheadAttention(8 heads, bias=True,
# add_bias_kv=True), no pre-transformer LayerNorm, drop path 0); head LayerNorm(eps 1e-6) ->
# SelectElement(0) -> Linear(384, 1024, bias=False); postprocessor Normalize -> LearnableLogitScaling(5.0).
DEPTH_D, DEPTH_OUT, DEPTH_BLOCKS = 384, 1024, 12
HUGE_DEPTH_KEYS = {
    "modality_preprocessors.depth.cls_token": (1, 1, DEPTH_D),
    "modality_preprocessors.depth.depth_stem.proj.weight": (DEPTH_D, 1, 16, 16),
    "modality_preprocessors.depth.depth_stem.norm_layer.weight": (DEPTH_D,),
    "modality_preprocessors.depth.depth_stem.norm_layer.bias": (DEPTH_D,),
    "modality_preprocessors.depth.pos_embedding_helper.pos_embed": (1, 197, DEPTH_D),
    "modality_heads.depth.0.weight": (DEPTH_D,),
    "modality_heads.depth.0.bias": (DEPTH_D,),
    "modality_heads.depth.2.weight": (DEPTH_OUT, DEPTH_D),
    "modality_postprocessors.depth.1.log_logit_scale": (),
}
HUGE_DEPTH_BLOCK_KEYS = {  # under modality_trunks.depth.blocks.<i>.
    "attn.in_proj_weight": (3 * DEPTH_D, DEPTH_D),
    "attn.in_proj_bias": (3 * DEPTH_D,),
    "attn.bias_k": (1, 1, DEPTH_D),
    "attn.bias_v": (1, 1, DEPTH_D),
    "attn.out_proj.weight": (DEPTH_D, DEPTH_D),
    "attn.out_proj.bias": (DEPTH_D,),
    "norm_1.weight": (DEPTH_D,),
    "norm_1.bias": (DEPTH_D,),
    "mlp.fc1.weight": (4 * DEPTH_D, DEPTH_D),
    "mlp.fc1.bias": (4 * DEPTH_D,),
    "mlp.fc2.weight": (DEPTH_D, 4 * DEPTH_D),
    "mlp.fc2.bias": (DEPTH_D,),
    "norm_2.weight": (DEPTH_D,),
    "norm_2.bias": (DEPTH_D,),
}


def _expected_huge_depth() -> dict[str, tuple[int, ...]]:
    out = dict(HUGE_DEPTH_KEYS)
    for i in range(DEPTH_BLOCKS):
        out.update({f"modality_trunks.depth.blocks.{i}.{k}": s for k, s in HUGE_DEPTH_BLOCK_KEYS.items()})
    return out


def test_huge_depth_keys_equal_metas() -> None:
    cfg = ImageBindConfig.from_dict({"preset": "huge", "modalities": ["depth", "vision", "audio"]})
    assert cfg.modalities == WITH_DEPTH  # Meta's order whatever the list's
    with torch.device("meta"):
        with_depth = ImageBindModel(cfg).state_dict()
        default = ImageBindModel(ImageBindConfig.huge()).state_dict()
    depth = {k: tuple(v.shape) for k, v in with_depth.items() if ".depth." in k}
    assert depth == _expected_huge_depth()
    assert len(depth) == 177  # 5 preprocessor + 12 x 14 trunk + 3 head + 1 postprocessor
    # vision/audio are untouched by adding depth, and the default build has no depth at all
    rest = {k: tuple(v.shape) for k, v in with_depth.items() if ".depth." not in k}
    assert rest == {k: tuple(v.shape) for k, v in default.items()}
    assert len(default) == 569 and not any(".depth." in k for k in default)
    n_depth = sum(v.numel() for k, v in with_depth.items() if ".depth." in k)
    assert n_depth == 21_871_873  # ViT-S/16 depth encoder of imagebind_huge
    assert cfg.depth_patch_layout == (14, 14)


def test_config_modalities_and_repr() -> None:
    # the text feature caches fingerprint: unchanged for vision+audio configs by the depth fields
    assert repr(ImageBindConfig.tiny()) == (
        "ImageBindConfig(out_embed_dim=48, vision_embed_dim=32, vision_num_blocks=2, vision_num_heads=2, "
        "vision_kernel_size=(2, 14, 14), image_size=224, audio_embed_dim=32, audio_num_blocks=2, audio_num_heads=2, "
        "audio_kernel_size=16, audio_stride=10, audio_num_mel_bins=128, audio_target_len=204, audio_drop_path=0.1)"
    )
    text = repr(_tiny_depth_cfg())
    assert "depth_embed_dim=24" in text and "modalities=('vision', 'audio', 'depth')" in text
    assert ImageBindConfig.tiny().modalities == ("vision", "audio")
    assert ImageBindConfig.from_dict({"preset": "tiny", "modalities": ["audio"]}).modalities == ("audio",)
    with pytest.raises(ValueError, match="thermal"):
        ImageBindConfig.from_dict({"preset": "tiny", "modalities": ["vision", "thermal"]})
    with pytest.raises(ValueError, match="twice"):
        ImageBindConfig.from_dict({"preset": "tiny", "modalities": ["depth", "depth"]})
    with pytest.raises(ValueError, match="at least one"):
        ImageBindConfig.from_dict({"preset": "tiny", "modalities": []})
    with pytest.raises(ValueError, match="divisible"):
        ImageBindConfig.from_dict({"preset": "tiny", "depth_num_heads": 5})
    assert ImageBindConfig.huge().depth_embed_dim == 384 and ImageBindConfig.huge().depth_num_heads == 8


# ---------------------------------------------------------------------------------------------
# (b) the tiny depth forward against a direct computation with plain tensor ops
# ---------------------------------------------------------------------------------------------
def _attention_with_bias_kv(
    h: torch.Tensor, sd: dict[str, torch.Tensor], pre: str, heads: int
) -> torch.Tensor:
    """nn.MultiheadAttention(add_bias_kv=True) written out, batch-first: the learnt bias_k / bias_v are
    one extra key / value position appended after the projections."""
    b, n, d = h.shape
    q, k, v = (h @ sd[pre + "in_proj_weight"].T + sd[pre + "in_proj_bias"]).split(d, dim=-1)
    k = torch.cat([k, sd[pre + "bias_k"].expand(b, 1, d)], dim=1)
    v = torch.cat([v, sd[pre + "bias_v"].expand(b, 1, d)], dim=1)

    def split(t):
        return t.reshape(b, t.shape[1], heads, d // heads).transpose(1, 2)

    q, k, v = split(q), split(k), split(v)
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), dim=-1)
    out = (att @ v).transpose(1, 2).reshape(b, n, d)
    return out @ sd[pre + "out_proj.weight"].T + sd[pre + "out_proj.bias"]


def _direct_depth(sd: dict[str, torch.Tensor], cfg: ImageBindConfig, x: torch.Tensor) -> torch.Tensor:
    d, heads = cfg.depth_embed_dim, cfg.depth_num_heads
    p = "modality_preprocessors.depth."
    t = F.conv2d(x, sd[p + "depth_stem.proj.weight"], stride=cfg.depth_kernel_size).flatten(2).transpose(1, 2)
    t = F.layer_norm(
        t, (d,), sd[p + "depth_stem.norm_layer.weight"], sd[p + "depth_stem.norm_layer.bias"]
    )  # eps 1e-5
    t = (
        torch.cat([sd[p + "cls_token"].expand(x.shape[0], -1, -1), t], dim=1)
        + sd[p + "pos_embedding_helper.pos_embed"]
    )
    for i in range(cfg.depth_num_blocks):  # no pre-transformer LayerNorm for depth
        b = f"modality_trunks.depth.blocks.{i}."
        h = F.layer_norm(t, (d,), sd[b + "norm_1.weight"], sd[b + "norm_1.bias"], eps=1e-6)
        t = t + _attention_with_bias_kv(h, sd, b + "attn.", heads)
        h = F.layer_norm(t, (d,), sd[b + "norm_2.weight"], sd[b + "norm_2.bias"], eps=1e-6)
        h = F.gelu(h @ sd[b + "mlp.fc1.weight"].T + sd[b + "mlp.fc1.bias"])
        t = t + h @ sd[b + "mlp.fc2.weight"].T + sd[b + "mlp.fc2.bias"]
    cls = F.layer_norm(
        t, (d,), sd["modality_heads.depth.0.weight"], sd["modality_heads.depth.0.bias"], eps=1e-6
    )[:, 0]
    emb = F.normalize(cls @ sd["modality_heads.depth.2.weight"].T, dim=-1)
    return emb * sd["modality_postprocessors.depth.1.log_logit_scale"].exp().clamp(max=100.0)


def test_tiny_depth_equals_direct_computation() -> None:
    cfg = _tiny_depth_cfg()
    torch.manual_seed(3)
    model = ImageBindModel(cfg).eval()
    with (
        torch.no_grad()
    ):  # random LayerNorm / bias values too, so a misplaced one can not hide behind 1s and 0s
        for name, p in model.named_parameters():
            if ".depth." in name:
                p.normal_(0.0, 0.3 if p.ndim == 1 else 0.1)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    assert sd["modality_postprocessors.depth.1.log_logit_scale"].item() == pytest.approx(
        math.log(DEPTH_LOGIT_SCALE)
    )
    x = torch.randn(3, 1, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ours = model.encode("depth", x)
        want = _direct_depth(sd, cfg, x)
        assert model({"depth": x})["depth"].equal(ours)
    assert ours.shape == (3, cfg.out_embed_dim)
    torch.testing.assert_close(ours, want, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(ours.norm(dim=-1), torch.full((3,), DEPTH_LOGIT_SCALE), atol=1e-4, rtol=0)


def test_depth_clips_empty_input_and_errors(tiny_depth: ImageBindModel) -> None:
    cfg = tiny_depth.cfg
    s = cfg.image_size
    x = torch.randn(2, 3, 1, s, s, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        per_item = torch.stack([tiny_depth.encode("depth", x[:, i]) for i in range(3)], 1)
        torch.testing.assert_close(
            tiny_depth.encode("depth", x), per_item.mean(1), atol=1e-5, rtol=1e-5
        )  # not renormalised
        unit = tiny_depth.encode("depth", x, renormalize=True)
        torch.testing.assert_close(unit.norm(dim=-1), torch.ones(2), atol=1e-5, rtol=0)
        empty = tiny_depth.empty_input("depth")
        assert empty.shape == (0, 1, s, s)
        assert tiny_depth.encode("depth", empty).shape == (0, cfg.out_embed_dim)
    with pytest.raises(ValueError, match="depth input"):
        tiny_depth.encode("depth", torch.zeros(1, 3, s, s))  # an RGB image is not a depth map
    with pytest.raises(ValueError, match="depth input"):
        tiny_depth.encode("depth", torch.zeros(1, 1, 112, 112))
    default = ImageBindModel(ImageBindConfig.tiny())
    for call in (
        lambda: default.encode("depth", torch.zeros(1, 1, s, s)),
        lambda: default.empty_input("depth"),
    ):
        with pytest.raises(ValueError, match="not built"):
            call()


# ---------------------------------------------------------------------------------------------
# (c) depth-map preprocessing
# ---------------------------------------------------------------------------------------------
def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _normalised(disparity_over_max: float) -> float:
    """The documented last step: (DepthNorm output - 0.0418) / 0.0295."""
    return (disparity_over_max - DEPTH_MEAN) / DEPTH_STD


def _metric(depth_m: float) -> float:
    """Omnivore's metric chain for one depth: clip [0.01, 50] m, baseline * fx / depth, clamp [0.01, 75], / 75."""
    disparity = KINECT_BASELINE * KINECT_FOCAL_LENGTH / min(max(depth_m, 0.01), 50.0)
    return _normalised(min(max(disparity, 0.01), 75.0) / 75.0)


def test_sixteen_bit_png_is_metric_depth_in_millimetres(tmp_path: Path) -> None:
    depth_mm = np.full(
        (240, 320), 2000, dtype=np.uint16
    )  # landscape: resized to 298x224, then centre-cropped
    depth_mm[:, :80] = 600  # near strip on the left: 74.5 px once resized, 37.5 px of it inside the crop
    depth_mm[:, 240:] = 6000  # far strip on the right: from resized column 223.5, i.e. 186.5 in the crop
    depth_mm[100:141, 140:181] = 0  # a hole (no sensor reading) in the middle
    path = tmp_path / "depth16.png"
    path.write_bytes(_png(depth_mm))
    assert Image.open(path).mode == "I;16"  # really a 16-bit PNG
    x = load_depth(path)
    assert x.shape == (1, 224, 224) and x.dtype == torch.float32
    # far from any edge the map is constant: exactly the documented formula
    assert x[0, 30, 100].item() == pytest.approx(_metric(2.0), abs=1e-4)
    # holes follow Omnivore: clipped to 0.01 m, i.e. the largest disparity
    assert x[0, 112, 112].item() == pytest.approx(_normalised(1.0), abs=1e-4)
    # geometry of load_image (short side 224, centre crop 37 px in from the left; left stays left)
    assert x[0, 10, 30].item() == pytest.approx(_metric(0.6), abs=1e-4)
    assert x[0, 10, 45].item() == pytest.approx(_metric(2.0), abs=1e-4)
    assert x[0, 10, 180].item() == pytest.approx(_metric(2.0), abs=1e-4)
    assert x[0, 10, 195].item() == pytest.approx(_metric(6.0), abs=1e-4)
    assert _metric(0.6) > _metric(2.0) > _metric(6.0)  # near = large disparity
    # the same depth given in metres as a float .npy (bytes, with a name) is the same map
    buf = io.BytesIO()
    np.save(buf, depth_mm.astype(np.float32)[None] / 1000.0)
    torch.testing.assert_close(load_depth(buf.getvalue(), name="depth.npy"), x, atol=1e-4, rtol=0)
    # and the registry's depth modality reads it so
    assert torch.equal(modality_registry.get("depth").load(path), x)


def test_eight_bit_png_is_relative_disparity(tmp_path: Path) -> None:
    rel = np.full((300, 200), 128, dtype=np.uint8)  # portrait: resized to 224x336, then centre-cropped
    rel[:20] = 255  # near top rows, cropped away
    path = tmp_path / "depth8.png"
    path.write_bytes(_png(rel))
    x = load_depth(path)
    assert x.shape == (1, 224, 224)
    torch.testing.assert_close(x, torch.full((1, 224, 224), _normalised(128 / 255)), atol=1e-5, rtol=0)
    # the same file read as metric millimetres (explicit encoding): 0.128 m -> past the 75 px clamp
    assert load_depth(path, encoding="depth")[0, 112, 112].item() == pytest.approx(_normalised(1.0), abs=1e-5)
    # an RGB file with three equal channels is a grey map; mean=0, std=1 leaves DepthNorm's [0, 1] output
    grey = tmp_path / "grey_rgb.png"
    grey.write_bytes(_png(np.repeat(rel[..., None], 3, axis=2)))
    raw = load_depth(grey, mean=0.0, std=1.0)
    torch.testing.assert_close(raw, torch.full((1, 224, 224), 128 / 255), atol=1e-6, rtol=0)
    # disparity already in pixels
    buf = io.BytesIO()
    np.save(buf, np.full((224, 224), 30.0))
    out = load_depth(buf.getvalue(), name="disp.npy", encoding="disparity")
    torch.testing.assert_close(out, torch.full((1, 224, 224), _normalised(30 / 75)), atol=1e-5, rtol=0)


def test_unreadable_depth_files_name_the_file(tmp_path: Path) -> None:
    good = _png(np.full((64, 64), 1500, dtype=np.uint16))
    cases = {
        "truncated.png": good[: len(good) // 2],
        "text.png": b"not an image at all\n" * 10,
        "colour.png": _png(
            np.stack(
                [
                    np.zeros((32, 32), np.uint8),
                    np.full((32, 32), 255, np.uint8),
                    np.zeros((32, 32), np.uint8),
                ],
                axis=2,
            )
        ),
    }
    bad_npy = io.BytesIO()
    np.save(bad_npy, np.zeros((2, 3, 4), np.float32))
    cases["cube.npy"] = bad_npy.getvalue()
    nan_npy = io.BytesIO()
    np.save(nan_npy, np.full((8, 8), np.nan, np.float32))
    cases["nan.npy"] = nan_npy.getvalue()
    cases["truncated.npy"] = cases["nan.npy"][:100]
    for fname, data in cases.items():
        path = tmp_path / fname
        path.write_bytes(data)
        with pytest.raises(MediaDecodeError) as e:
            load_depth(path)
        assert str(path) in str(e.value) and e.value.path == str(path) and e.value.reason, fname
    with pytest.raises(MediaDecodeError, match="colour"):
        load_depth(tmp_path / "colour.png")
    with pytest.raises(MediaDecodeError, match="does not exist"):
        load_depth(tmp_path / "missing.png")
    with pytest.raises(MediaDecodeError, match="shard.tar:0001.png"):
        load_depth(cases["truncated.png"], name="shard.tar:0001.png")
    with pytest.raises(ValueError, match="encoding"):
        load_depth(tmp_path / "truncated.png", encoding="inverse")


def test_preprocessed_depth_encodes(tiny_depth: ImageBindModel, tmp_path: Path) -> None:
    path = tmp_path / "d.png"
    path.write_bytes(_png(np.random.default_rng(0).integers(400, 8000, (240, 320)).astype(np.uint16)))
    x = load_depth(path)
    with torch.no_grad():
        emb = tiny_depth.encode("depth", x[None])
    assert emb.shape == (1, tiny_depth.embed_dim) and torch.isfinite(emb).all()
    assert emb.norm().item() == pytest.approx(DEPTH_LOGIT_SCALE, abs=1e-4)


# ---------------------------------------------------------------------------------------------
# (d) checkpoints
# ---------------------------------------------------------------------------------------------
def test_round_trip_with_depth_is_bit_identical(tiny_depth: ImageBindModel, tmp_path: Path) -> None:
    path = tmp_path / "imagebind_tiny_depth.pth"
    torch.save(tiny_depth.state_dict(), path)
    loaded = load_imagebind(path, tiny_depth.cfg)
    assert not loaded.training and all(not p.requires_grad for p in loaded.parameters())
    assert loaded.state_dict().keys() == tiny_depth.state_dict().keys()
    assert all(
        torch.equal(a, b)
        for a, b in zip(loaded.state_dict().values(), tiny_depth.state_dict().values(), strict=False)
    )
    g = torch.Generator().manual_seed(6)
    s = tiny_depth.cfg.image_size
    inputs = {
        "depth": torch.randn(2, 1, s, s, generator=g),
        "vision": torch.randn(2, 3, s, s, generator=g),
        "audio": torch.randn(2, 3, 1, 128, 204, generator=g),
    }
    with torch.no_grad():
        a, b = tiny_depth(inputs), loaded(inputs)
    for m in inputs:
        assert torch.equal(a[m], b[m]), m
    # the same file under the default (vision+audio) config: the depth keys are ignored
    plain = load_imagebind(path, ImageBindConfig.tiny())
    assert plain.modalities == ("vision", "audio")
    with torch.no_grad():
        assert torch.equal(plain.encode("vision", inputs["vision"]), a["vision"])


def test_checkpoint_without_depth_fails_clearly_only_when_depth_is_built(tmp_path: Path) -> None:
    torch.manual_seed(0)
    path = tmp_path / "imagebind_tiny.pth"  # what existing tiny builds hold: vision + audio only
    torch.save(ImageBindModel(ImageBindConfig.tiny()).state_dict(), path)
    load_imagebind(path, ImageBindConfig.tiny())  # fine without depth
    with pytest.raises(ImageBindCheckpointError) as e:
        load_imagebind(path, _tiny_depth_cfg())
    msg = str(e.value)
    assert str(path) in msg and "no depth weights" in msg and "modalities" in msg
    # a depth branch of the wrong size is a shape mismatch naming the key
    torch.manual_seed(0)
    wide = tmp_path / "wide_depth.pth"
    torch.save(
        ImageBindModel(
            ImageBindConfig.from_dict(
                {"preset": "tiny", "modalities": list(WITH_DEPTH), "depth_embed_dim": 32}
            )
        ).state_dict(),
        wide,
    )
    with pytest.raises(ImageBindCheckpointError, match="modality_preprocessors.depth.cls_token"):
        load_imagebind(wide, _tiny_depth_cfg())
