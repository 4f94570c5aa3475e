"""ImageBind (vision + audio) encoder: a compact re-implementation whose state dict matches Meta's.

NExT-GPT feeds the frozen ImageBind-huge embedding of an image, video or audio clip into its input
projection. Only the "vision" and "audio" branches are needed, so this module builds just those,
with parameter and buffer names and shapes identical to the corresponding entries of the official
``imagebind_huge.pth``. That lets :func:`load_imagebind` load the real checkpoint directly (the
other modalities' keys are ignored), and lets tests use a tiny configuration of the same code.

Numerics follow the original forward pass: images are repeated to a 2-frame video (``PadIm2Video``
"repeat"), patchified by a bias-free Conv3d (vision) or a Conv2d + LayerNorm (audio), a class token
and a learnable position embedding are added, a pre-LN transformer runs with
``nn.MultiheadAttention`` in sequence-first layout (audio uses ``add_bias_kv``; only vision has the
pre-transformer LayerNorm), the head takes the LayerNorm-ed class token through a bias-free Linear
and the postprocessor L2-normalises it (audio then multiplies by the fixed logit scale 20). Inputs
with a clip axis are averaged over clips *after* the postprocessor, without renormalising, exactly as
``ImageBindModel.forward`` does.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ImageBindCheckpointError",
    "ImageBindConfig",
    "ImageBindModel",
    "load_imagebind",
]

# The original pads a single image to this many frames ("PadIm2Video(ntimes=2)") and builds the vision
# position embedding for a video of this length (``video_frames=2``).
_VIDEO_FRAMES = 2
# LearnableLogitScaling(logit_scale_init=20.0, learnable=False, max_logit_scale=100) of the audio branch.
_AUDIO_LOGIT_SCALE = 20.0
_MAX_LOGIT_SCALE = 100.0
_LN_EPS = 1e-6  # every LayerNorm of the trunks and heads; the audio stem's LayerNorm uses the default
_MLP_RATIO = 4


@dataclass(frozen=True, kw_only=True)
class ImageBindConfig:
    """Sizes of the vision and audio branches (the names follow Meta's ``ImageBindModel`` arguments)."""

    out_embed_dim: int
    vision_embed_dim: int
    vision_num_blocks: int
    vision_num_heads: int
    vision_kernel_size: tuple[int, int, int] = (2, 14, 14)
    image_size: int = 224
    audio_embed_dim: int
    audio_num_blocks: int
    audio_num_heads: int
    audio_kernel_size: int = 16
    audio_stride: int = 10
    audio_num_mel_bins: int = 128
    audio_target_len: int = 204
    audio_drop_path: float = 0.1

    def __post_init__(self) -> None:
        ks = tuple(int(k) for k in self.vision_kernel_size)
        object.__setattr__(self, "vision_kernel_size", ks)
        if len(ks) != 3 or min(ks) < 1:
            raise ValueError(f"vision_kernel_size must be 3 positive ints (T, H, W), got {self.vision_kernel_size}")
        for name in (
            "out_embed_dim", "vision_embed_dim", "vision_num_blocks", "vision_num_heads", "image_size",
            "audio_embed_dim", "audio_num_blocks", "audio_num_heads", "audio_kernel_size", "audio_stride",
            "audio_num_mel_bins", "audio_target_len",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ImageBindConfig.{name} must be a positive int, got {value!r}")
        for prefix in ("vision", "audio"):
            dim, heads = getattr(self, f"{prefix}_embed_dim"), getattr(self, f"{prefix}_num_heads")
            if dim % heads:
                raise ValueError(f"{prefix}_embed_dim={dim} is not divisible by {prefix}_num_heads={heads}")
        if ks[0] > _VIDEO_FRAMES or ks[1] > self.image_size or ks[2] > self.image_size:
            raise ValueError(f"vision_kernel_size {ks} does not fit a {_VIDEO_FRAMES}x{self.image_size}^2 clip")
        if self.audio_kernel_size > min(self.audio_num_mel_bins, self.audio_target_len):
            raise ValueError("audio_kernel_size is larger than the (mel bins x frames) spectrogram")
        if not 0.0 <= float(self.audio_drop_path) < 1.0:
            raise ValueError(f"audio_drop_path must be in [0, 1), got {self.audio_drop_path}")

    # ---- derived sizes (computed, never typed in) ----
    @property
    def vision_patch_layout(self) -> tuple[int, int, int]:
        """(T, H, W) grid of the Conv3d stem for a ``_VIDEO_FRAMES``-frame ``image_size`` clip."""
        kt, kh, kw = self.vision_kernel_size
        return (_conv_out(_VIDEO_FRAMES, kt, kt), _conv_out(self.image_size, kh, kh), _conv_out(self.image_size, kw, kw))

    @property
    def audio_patch_layout(self) -> tuple[int, int]:
        """(mel, time) grid of the Conv2d stem for a ``(num_mel_bins, target_len)`` spectrogram."""
        k, s = self.audio_kernel_size, self.audio_stride
        return (_conv_out(self.audio_num_mel_bins, k, s), _conv_out(self.audio_target_len, k, s))

    @classmethod
    def huge(cls) -> "ImageBindConfig":
        """``imagebind_huge``: ViT-H/14 vision (1280 wide, 32 blocks), ViT-B audio, 1024-d joint space."""
        return cls(
            out_embed_dim=1024,
            vision_embed_dim=1280, vision_num_blocks=32, vision_num_heads=16,
            audio_embed_dim=768, audio_num_blocks=12, audio_num_heads=12,
            audio_drop_path=0.1,
        )

    @classmethod
    def tiny(cls) -> "ImageBindConfig":
        """Same code and input sizes as ``huge`` at 32 width / 2 blocks, for fast tests; the
        48-d output differs from every other tiny width so a swapped width can not pass unnoticed."""
        return cls(
            out_embed_dim=48,
            vision_embed_dim=32, vision_num_blocks=2, vision_num_heads=2,
            audio_embed_dim=32, audio_num_blocks=2, audio_num_heads=2,
        )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ImageBindConfig":
        """Build from a Hydra/YAML mapping: ``{"preset": "huge"|"tiny", **overrides}`` or all fields."""
        if not isinstance(d, Mapping):
            raise ValueError(f"ImageBindConfig.from_dict expects a mapping, got {type(d).__name__}")
        items = {str(k): v for k, v in d.items()}
        known = {f.name for f in fields(cls)}
        unknown = sorted(k for k in items if k not in known and k != "preset")
        if unknown:
            raise ValueError(f"unknown ImageBindConfig key(s): {', '.join(unknown)} (known: preset, {', '.join(sorted(known))})")
        preset = items.pop("preset", None)
        if "vision_kernel_size" in items and items["vision_kernel_size"] is not None:
            items["vision_kernel_size"] = tuple(items["vision_kernel_size"])
        if preset is None:
            required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
            missing = sorted(required - items.keys())
            if missing:
                raise ValueError(f"ImageBindConfig needs a 'preset' or the field(s): {', '.join(missing)}")
            return cls(**items)
        presets = {"huge": cls.huge, "tiny": cls.tiny}
        if preset not in presets:
            raise ValueError(f"unknown ImageBindConfig preset {preset!r} (known: {', '.join(presets)})")
        base = {f.name: getattr(presets[preset](), f.name) for f in fields(cls)}
        base.update(items)
        return cls(**base)


def _conv_out(size: int, kernel: int, stride: int) -> int:
    return (size - kernel) // stride + 1


# --------------------------------------------------------------------------------------------------
# Building blocks. Module attribute names are chosen so that state-dict keys equal Meta's.
# --------------------------------------------------------------------------------------------------
class _PadIm2Video(nn.Module):
    """(B,C,H,W) image -> (B,C,T,H,W) video by repeating it ``ntimes`` (a single frame is repeated too)."""

    def __init__(self, ntimes: int) -> None:
        super().__init__()
        self.ntimes = ntimes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 4:
            x = x.unsqueeze(2)
        if x.shape[2] == 1:
            x = x.repeat(1, 1, self.ntimes, 1, 1)
        return x


class _PatchStem(nn.Module):
    """Conv patchifier (``proj``) -> (B, tokens, D), optional LayerNorm (``norm_layer``)."""

    def __init__(self, proj: nn.Module, norm_layer: nn.Module | None = None) -> None:
        super().__init__()
        self.proj = proj
        self.norm_layer = norm_layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x).flatten(2).transpose(1, 2)
        if self.norm_layer is not None:
            x = self.norm_layer(x)
        return x


class _PosEmbedding(nn.Module):
    """Holds the learnable ``pos_embed`` (1, cls + patches, D) like SpatioTemporalPosEmbeddingHelper."""

    def __init__(self, num_tokens: int, dim: int) -> None:
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, dim))


class _TokenPreprocessor(nn.Module):
    """Stem + class token + position embedding (RGBDTPreprocessor / AudioPreprocessor)."""

    def __init__(self, stem: _PatchStem, num_patches: int, dim: int) -> None:
        super().__init__()
        self.rgbt_stem = stem
        self.num_patches = num_patches
        self.pos_embedding_helper = _PosEmbedding(1 + num_patches, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        with torch.no_grad():  # OpenCLIP-style init, as the original
            nn.init.normal_(self.pos_embedding_helper.pos_embed).mul_(dim**-0.5)
            nn.init.normal_(self.cls_token).mul_(dim**-0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.rgbt_stem(x)
        if tokens.shape[1] != self.num_patches:
            # The original bicubically interpolates the position embedding here; ImageBind's own
            # preprocessing never needs it, so other input sizes are rejected instead.
            raise ValueError(
                f"input {tuple(x.shape)} gives {tokens.shape[1]} patches, the position embedding has "
                f"{self.num_patches}; resize inputs to the configured size"
            )
        tokens = torch.cat((self.cls_token.expand(tokens.shape[0], -1, -1), tokens), dim=1)
        return tokens + self.pos_embedding_helper.pos_embed


class _DropPath(nn.Module):
    """Stochastic depth as timm's DropPath, applied to dim 0 of the (L, B, D) tokens like the original."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _Block(nn.Module):
    """Pre-LN transformer block (BlockWithMasking without layer scale, which ImageBind does not use)."""

    def __init__(self, dim: int, num_heads: int, add_bias_kv: bool, drop_path: float) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, num_heads, bias=True, add_bias_kv=add_bias_kv)
        self.drop_path = _DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm_1 = nn.LayerNorm(dim, eps=_LN_EPS)
        self.mlp = _Mlp(dim, int(_MLP_RATIO * dim))
        self.norm_2 = nn.LayerNorm(dim, eps=_LN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (L, B, D)
        h = self.norm_1(x)
        x = x + self.drop_path(self.attn(h, h, h, need_weights=False)[0])
        return x + self.drop_path(self.mlp(self.norm_2(x)))


class _SeqFirst(nn.Module):
    """(B, L, D) <-> (L, B, D), the EinOpsRearrange layers of the original (no parameters)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(0, 1)


class _Trunk(nn.Module):
    """SimpleTransformer: optional pre-LN, blocks in (L, B, D) layout, back to (B, L, D)."""

    def __init__(self, dim: int, num_blocks: int, num_heads: int, pre_ln: bool, add_bias_kv: bool,
                 drop_path: float) -> None:
        super().__init__()
        self.pre_transformer_layer = nn.Sequential(
            nn.LayerNorm(dim, eps=_LN_EPS) if pre_ln else nn.Identity(), _SeqFirst()
        )
        rates = [r.item() for r in torch.linspace(0, drop_path, num_blocks, device="cpu")]  # "progressive"
        self.blocks = nn.Sequential(*[_Block(dim, num_heads, add_bias_kv, r) for r in rates])
        self.post_transformer_layer = _SeqFirst()
        self.apply(self._init_weights)
        for blk in self.blocks:  # re-init what apply() does not reach, as nn.MultiheadAttention does
            if blk.attn.bias_k is not None:
                nn.init.xavier_normal_(blk.attn.bias_k)
                nn.init.xavier_normal_(blk.attn.bias_v)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:  # "jax" style, as SimpleTransformer
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.pre_transformer_layer(tokens)
        for blk in self.blocks:
            x = blk(x)
        return self.post_transformer_layer(x)


class _SelectCls(nn.Module):
    """SelectElement(index=0): the class token."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0, ...]


class _L2Normalize(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1, p=2)


class _FixedLogitScale(nn.Module):
    """LearnableLogitScaling(learnable=False): multiplies by clip(exp(log_logit_scale), max=100)."""

    def __init__(self, init: float) -> None:
        super().__init__()
        self.register_buffer("log_logit_scale", torch.ones([]) * math.log(init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clip(self.log_logit_scale.exp(), max=_MAX_LOGIT_SCALE) * x


def _head(dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(dim, eps=_LN_EPS), _SelectCls(), nn.Linear(dim, out_dim, bias=False))


# --------------------------------------------------------------------------------------------------
class ImageBindModel(nn.Module):
    """The vision and audio branches of ImageBind with Meta's state-dict layout."""

    modalities = ("vision", "audio")

    def __init__(self, cfg: ImageBindConfig) -> None:
        super().__init__()
        self.cfg = cfg
        vd, ad = cfg.vision_embed_dim, cfg.audio_embed_dim
        vision_stem = _PatchStem(
            nn.Sequential(
                _PadIm2Video(_VIDEO_FRAMES),
                nn.Conv3d(3, vd, kernel_size=cfg.vision_kernel_size, stride=cfg.vision_kernel_size, bias=False),
            )
        )
        audio_stem = _PatchStem(
            nn.Conv2d(1, ad, kernel_size=cfg.audio_kernel_size, stride=cfg.audio_stride, bias=False),
            norm_layer=nn.LayerNorm(ad),
        )
        self.modality_preprocessors = nn.ModuleDict({
            "vision": _TokenPreprocessor(vision_stem, math.prod(cfg.vision_patch_layout), vd),
            "audio": _TokenPreprocessor(audio_stem, math.prod(cfg.audio_patch_layout), ad),
        })
        self.modality_trunks = nn.ModuleDict({
            "vision": _Trunk(vd, cfg.vision_num_blocks, cfg.vision_num_heads, pre_ln=True, add_bias_kv=False,
                             drop_path=0.0),
            "audio": _Trunk(ad, cfg.audio_num_blocks, cfg.audio_num_heads, pre_ln=False, add_bias_kv=True,
                            drop_path=float(cfg.audio_drop_path)),
        })
        self.modality_heads = nn.ModuleDict({
            "vision": _head(vd, cfg.out_embed_dim),
            "audio": _head(ad, cfg.out_embed_dim),
        })
        self.modality_postprocessors = nn.ModuleDict({
            "vision": _L2Normalize(),
            "audio": nn.Sequential(_L2Normalize(), _FixedLogitScale(_AUDIO_LOGIT_SCALE)),
        })

    @property
    def embed_dim(self) -> int:
        """Width of the joint embedding space (``cfg.out_embed_dim``)."""
        return self.cfg.out_embed_dim

    def empty_input(self, modality: str) -> torch.Tensor:
        """A batch of zero items of ``modality``: running it costs nothing, but the trunk's modules
        still run, so data-parallel ranks without that modality run the same modules as the rest."""
        ref = self.modality_heads[modality][2].weight
        cfg = self.cfg
        shape = {"vision": (0, 3, cfg.image_size, cfg.image_size),
                 "audio": (0, 1, 1, cfg.audio_num_mel_bins, cfg.audio_target_len)}[modality]
        return torch.zeros(shape, device=ref.device, dtype=ref.dtype)

    def _check_input(self, modality: str, x: torch.Tensor) -> None:
        cfg = self.cfg
        if modality == "vision":
            item = x.shape[2:] if x.ndim >= 5 else x.shape[1:]
            ok = x.ndim in (4, 5, 6) and item[0] == 3 and tuple(item[-2:]) == (cfg.image_size, cfg.image_size)
            want = f"(B,3,{cfg.image_size},{cfg.image_size}) images or (B,S,3,T,{cfg.image_size},{cfg.image_size}) clips"
        elif modality == "audio":
            item = x.shape[2:] if x.ndim >= 5 else x.shape[1:]
            ok = x.ndim in (4, 5) and tuple(item) == (1, cfg.audio_num_mel_bins, cfg.audio_target_len)
            want = f"(B,S,1,{cfg.audio_num_mel_bins},{cfg.audio_target_len}) spectrogram clips"
        else:
            raise ValueError(f"unknown ImageBind modality {modality!r}; expected one of {self.modalities}")
        if not ok:
            raise ValueError(f"ImageBind {modality} input has shape {tuple(x.shape)}; expected {want}")

    def encode(self, modality: str, x: torch.Tensor, *, renormalize: bool = False) -> torch.Tensor:
        """Embed one modality: (B, out_embed_dim), the output NExT-GPT feeds to its input projection.

        x: vision (B,3,H,W) image, or (B,S,3,T,H,W) video clips/crops; audio (B,S,1,mel,frames).
        Per item the output is L2-normalised (audio: then times the fixed logit scale 20, as the
        original postprocessor). With a clip axis S (``x.ndim >= 5``, the original's rule) the per-clip
        outputs are averaged and, as in the original forward, *not* renormalised, so video norms are
        <= 1 and audio norms <= 20. ``renormalize=True`` L2-normalises the final vector instead.
        """
        self._check_input(modality, x)
        ref = self.modality_heads[modality][2].weight
        x = x.to(device=ref.device, dtype=ref.dtype)
        reduce = x.ndim >= 5
        if reduce:
            b, s = x.shape[:2]
            x = x.reshape(b * s, *x.shape[2:])
        tokens = self.modality_preprocessors[modality](x)
        tokens = self.modality_trunks[modality](tokens)
        out = self.modality_postprocessors[modality](self.modality_heads[modality](tokens))
        if reduce:
            out = out.reshape(b, s, out.shape[-1]).mean(dim=1)
        if renormalize:
            out = F.normalize(out, dim=-1, p=2)
        return out

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Dict in, dict out, like the original ``ImageBindModel.forward``."""
        return {m: self.encode(m, x) for m, x in inputs.items() if x is not None}


# --------------------------------------------------------------------------------------------------
class ImageBindCheckpointError(RuntimeError):
    """The ImageBind weights file is missing, unreadable, or does not fit the configuration."""


_OUR_PREFIXES = tuple(
    f"{part}.{m}." for part in ("modality_preprocessors", "modality_trunks", "modality_heads",
                                "modality_postprocessors") for m in ImageBindModel.modalities
)
_MAX_LISTED = 10


def _listing(title: str, entries: list[str]) -> str:
    more = f"\n    ... and {len(entries) - _MAX_LISTED} more" if len(entries) > _MAX_LISTED else ""
    return f"\n  {title} ({len(entries)}):\n    " + "\n    ".join(entries[:_MAX_LISTED]) + more


def _unwrap(obj: Any) -> Any:
    """Accept a bare state dict or one nested under "model"/"state_dict"/"module"."""
    for key in ("model", "state_dict", "module"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping) \
                and not any(isinstance(k, str) and k.startswith(_OUR_PREFIXES) for k in obj):
            obj = obj[key]
    return obj


def load_imagebind(path: str | os.PathLike, cfg: ImageBindConfig, *, dtype: torch.dtype = torch.float32) -> ImageBindModel:
    """Load Meta's ``imagebind_huge.pth`` (or a state dict saved from this class) into a frozen model.

    The check is strict over the vision/audio keys (missing, unexpected or wrongly shaped entries all
    fail, with the path and up to 10 offending keys in the message); keys of other modalities are
    ignored. The model is built on the meta device and the checkpoint tensors are assigned, so no
    random init of a 1B-parameter model is paid. Returns it in eval mode, requires_grad False, in dtype.
    """
    p = Path(path)
    if not p.is_file():
        raise ImageBindCheckpointError(f"ImageBind checkpoint not found: {p}")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle garbage, non-tensor objects, ...
        raise ImageBindCheckpointError(
            f"ImageBind checkpoint {p} is unreadable or truncated: {type(e).__name__}: {e}"
        ) from e
    state = _unwrap(state)
    if not isinstance(state, Mapping):
        raise ImageBindCheckpointError(f"ImageBind checkpoint {p} holds a {type(state).__name__}, not a state dict")
    ours = {k: v for k, v in state.items() if isinstance(k, str) and k.startswith(_OUR_PREFIXES)}
    if not ours:
        sample = ", ".join(map(str, list(state)[:5])) or "<empty>"
        raise ImageBindCheckpointError(
            f"ImageBind checkpoint {p} has no vision/audio keys (first keys: {sample})"
        )

    with torch.device("meta"):
        model = ImageBindModel(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [f"{k} {expected[k]}" for k in sorted(expected.keys() - ours.keys())]
    unexpected = [k for k in sorted(ours.keys() - expected.keys())]
    not_tensor = [k for k in sorted(ours) if not isinstance(ours[k], torch.Tensor)]
    mismatched = [
        f"{k}: checkpoint {tuple(ours[k].shape)} vs model {expected[k]}"
        for k in sorted(expected.keys() & ours.keys())
        if isinstance(ours[k], torch.Tensor) and tuple(ours[k].shape) != expected[k]
    ]
    if missing or unexpected or not_tensor or mismatched:
        msg = f"ImageBind checkpoint {p} does not match the configuration {cfg}:"
        if missing:
            msg += _listing("missing keys", missing)
        if mismatched:
            msg += _listing("shape mismatches", mismatched)
        if unexpected:
            msg += _listing("unexpected vision/audio keys", unexpected)
        if not_tensor:
            msg += _listing("non-tensor values", not_tensor)
        raise ImageBindCheckpointError(msg)

    model.load_state_dict(ours, strict=True, assign=True)
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:  # cannot happen with a strict load; guards future non-persistent buffers
        raise ImageBindCheckpointError(f"ImageBind checkpoint {p}: tensors left uninitialised: {leftover[:_MAX_LISTED]}")
    model = model.to(dtype=dtype)
    model.requires_grad_(False)
    return model.eval()
