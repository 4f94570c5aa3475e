"""ImageBind (vision + audio, optionally depth) encoder: a compact re-implementation whose state dict matches Meta's.

NExT-GPT feeds the frozen ImageBind-huge embedding of an image, video or audio clip into its input
projection. This module builds only the branches a configuration lists in
``ImageBindConfig.modalities`` (default vision and audio; depth is opt-in), with parameter and buffer
names and shapes identical to the corresponding entries of the official ``imagebind_huge.pth``.
That lets :func:`load_imagebind` load the real checkpoint directly (the keys of modalities not
built are ignored), and lets tests use a tiny configuration of the same code.

The branches differ only in what :data:`_SPECS` records per modality (stem, patch grid, input shape,
pre-LN, ``add_bias_kv``, drop path, logit scale); preprocessor, trunk, head and postprocessor are
one shared code path. Numerics follow the original forward pass: images are repeated to a 2-frame
video (``PadIm2Video`` "repeat"), patchified by a bias-free Conv3d (vision) or a bias-free Conv2d +
LayerNorm (audio: kernel 16 stride 10 over the spectrogram; depth: kernel 16 stride 16 over the
single-channel disparity map, stored as the preprocessor's ``depth_stem`` as Meta's
``RGBDTPreprocessor(rgbt_stem=None, depth_stem=...)`` does), a class token and a learnable position
embedding are added, a pre-LN transformer runs with ``nn.MultiheadAttention`` in sequence-first
layout (audio and depth use ``add_bias_kv``; only vision has the pre-transformer LayerNorm), the
head takes the LayerNorm-ed class token through a bias-free Linear and the postprocessor
L2-normalises it (audio then multiplies by the fixed logit scale 20, depth by 5). Inputs with a clip
axis are averaged over clips *after* the postprocessor, without renormalising, exactly as
``ImageBindModel.forward`` does.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
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
# LearnableLogitScaling(logit_scale_init=..., learnable=False, max_logit_scale=100) of the audio / depth branches.
_AUDIO_LOGIT_SCALE = 20.0
_DEPTH_LOGIT_SCALE = 5.0
_MAX_LOGIT_SCALE = 100.0
_LN_EPS = 1e-6  # every LayerNorm of the trunks and heads; the audio stem's LayerNorm uses the default
_MLP_RATIO = 4
# Every branch this module can build, in the order Meta's ImageBindModel creates them (also the order
# modules are created in, so a vision+audio model draws the same random init as before depth existed).
_KNOWN_MODALITIES = ("vision", "audio", "depth")
_DEFAULT_MODALITIES = ("vision", "audio")
BRANCHES = _KNOWN_MODALITIES  # every branch this module can build (a checkpoint may hold them all)


@dataclass(frozen=True, kw_only=True)
class ImageBindConfig:
    """Sizes of the branches (the names follow Meta's ``ImageBindModel`` arguments) and which ones to build.

    ``modalities`` lists the branches the model builds (any order in, Meta's order kept); the depth
    sizes default to Meta's (``ImageBindModel`` defaults, also what ``imagebind_huge`` uses), so a
    config only needs ``modalities: [vision, audio, depth]`` to add Meta's depth encoder.
    """

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
    depth_embed_dim: int = 384
    depth_num_blocks: int = 12
    depth_num_heads: int = 8
    depth_kernel_size: int = 16
    depth_drop_path: float = 0.0
    # Last, and left out of repr() at its default: see __repr__.
    modalities: tuple[str, ...] = _DEFAULT_MODALITIES

    def __post_init__(self) -> None:
        ks = tuple(int(k) for k in self.vision_kernel_size)
        object.__setattr__(self, "vision_kernel_size", ks)
        object.__setattr__(self, "modalities", _canonical_modalities(self.modalities))
        if len(ks) != 3 or min(ks) < 1:
            raise ValueError(
                f"vision_kernel_size must be 3 positive ints (T, H, W), got {self.vision_kernel_size}"
            )
        for name in (
            "out_embed_dim",
            "vision_embed_dim",
            "vision_num_blocks",
            "vision_num_heads",
            "image_size",
            "audio_embed_dim",
            "audio_num_blocks",
            "audio_num_heads",
            "audio_kernel_size",
            "audio_stride",
            "audio_num_mel_bins",
            "audio_target_len",
            "depth_embed_dim",
            "depth_num_blocks",
            "depth_num_heads",
            "depth_kernel_size",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ImageBindConfig.{name} must be a positive int, got {value!r}")
        for prefix in _KNOWN_MODALITIES:
            dim, heads = getattr(self, f"{prefix}_embed_dim"), getattr(self, f"{prefix}_num_heads")
            if dim % heads:
                raise ValueError(f"{prefix}_embed_dim={dim} is not divisible by {prefix}_num_heads={heads}")
        if ks[0] > _VIDEO_FRAMES or ks[1] > self.image_size or ks[2] > self.image_size:
            raise ValueError(
                f"vision_kernel_size {ks} does not fit a {_VIDEO_FRAMES}x{self.image_size}^2 clip"
            )
        if self.audio_kernel_size > min(self.audio_num_mel_bins, self.audio_target_len):
            raise ValueError("audio_kernel_size is larger than the (mel bins x frames) spectrogram")
        if self.depth_kernel_size > self.image_size:
            raise ValueError(
                f"depth_kernel_size {self.depth_kernel_size} is larger than the {self.image_size}^2 depth map"
            )
        for name in ("audio_drop_path", "depth_drop_path"):
            if not 0.0 <= float(getattr(self, name)) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")

    def __repr__(self) -> str:
        # Feature caches fingerprint repr(cfg) (nextgpt.cache.encode). Showing only the fields of the
        # branches that are built (and `modalities` only when not the default) keeps a vision+audio
        # config's text, and so its caches, what they were before depth fields existed; a config that
        # builds depth shows them all.
        shown = [f.name for f in fields(self) if _field_modality(f.name) in (None, *self.modalities)]
        if self.modalities == _DEFAULT_MODALITIES:
            shown.remove("modalities")
        return f"{type(self).__name__}(" + ", ".join(f"{n}={getattr(self, n)!r}" for n in shown) + ")"

    # ---- derived sizes (computed, never typed in) ----
    @property
    def vision_patch_layout(self) -> tuple[int, int, int]:
        """(T, H, W) grid of the Conv3d stem for a ``_VIDEO_FRAMES``-frame ``image_size`` clip."""
        kt, kh, kw = self.vision_kernel_size
        return (
            _conv_out(_VIDEO_FRAMES, kt, kt),
            _conv_out(self.image_size, kh, kh),
            _conv_out(self.image_size, kw, kw),
        )

    @property
    def audio_patch_layout(self) -> tuple[int, int]:
        """(mel, time) grid of the Conv2d stem for a ``(num_mel_bins, target_len)`` spectrogram."""
        k, s = self.audio_kernel_size, self.audio_stride
        return (_conv_out(self.audio_num_mel_bins, k, s), _conv_out(self.audio_target_len, k, s))

    @property
    def depth_patch_layout(self) -> tuple[int, int]:
        """(H, W) grid of the non-overlapping Conv2d stem for an ``image_size`` square depth map."""
        k = self.depth_kernel_size
        return (_conv_out(self.image_size, k, k), _conv_out(self.image_size, k, k))

    @classmethod
    def huge(cls) -> ImageBindConfig:
        """``imagebind_huge``: ViT-H/14 vision (1280 wide, 32 blocks), ViT-B audio, ViT-S depth, 1024-d joint space."""
        return cls(
            out_embed_dim=1024,
            vision_embed_dim=1280,
            vision_num_blocks=32,
            vision_num_heads=16,
            audio_embed_dim=768,
            audio_num_blocks=12,
            audio_num_heads=12,
            audio_drop_path=0.1,
            depth_embed_dim=384,
            depth_num_blocks=12,
            depth_num_heads=8,
            depth_drop_path=0.0,
        )

    @classmethod
    def tiny(cls) -> ImageBindConfig:
        """Same code and input sizes as ``huge`` at 32 width / 2 blocks (depth 24 wide), for fast tests;
        the 48-d output and 24-d depth differ from every other tiny width so a swapped width can not
        pass unnoticed."""
        return cls(
            out_embed_dim=48,
            vision_embed_dim=32,
            vision_num_blocks=2,
            vision_num_heads=2,
            audio_embed_dim=32,
            audio_num_blocks=2,
            audio_num_heads=2,
            depth_embed_dim=24,
            depth_num_blocks=2,
            depth_num_heads=2,
        )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ImageBindConfig:
        """Build from a Hydra/YAML mapping: ``{"preset": "huge"|"tiny", **overrides}`` or all fields."""
        if not isinstance(d, Mapping):
            raise ValueError(f"ImageBindConfig.from_dict expects a mapping, got {type(d).__name__}")
        items = {str(k): v for k, v in d.items()}
        known = {f.name for f in fields(cls)}
        unknown = sorted(k for k in items if k not in known and k != "preset")
        if unknown:
            raise ValueError(
                f"unknown ImageBindConfig key(s): {', '.join(unknown)} (known: preset, {', '.join(sorted(known))})"
            )
        preset = items.pop("preset", None)
        for key in ("vision_kernel_size", "modalities"):  # YAML gives lists
            if key in items and items[key] is not None and not isinstance(items[key], str):
                items[key] = tuple(items[key])
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


def _canonical_modalities(value: Any) -> tuple[str, ...]:
    """The listed branches in Meta's order (so module creation order, and with it init, does not
    depend on how a YAML file orders them); unknown names, duplicates and an empty list fail."""
    names = (value,) if isinstance(value, str) else tuple(value)
    unknown = [n for n in names if n not in _KNOWN_MODALITIES]
    if unknown:
        raise ValueError(
            f"ImageBindConfig.modalities: unknown modality {unknown[0]!r} (known: {', '.join(_KNOWN_MODALITIES)})"
        )
    if len(set(names)) != len(names):
        raise ValueError(f"ImageBindConfig.modalities lists a modality twice: {list(names)}")
    if not names:
        raise ValueError("ImageBindConfig.modalities must list at least one modality")
    return tuple(m for m in _KNOWN_MODALITIES if m in names)


def _field_modality(name: str) -> str | None:
    """The branch a config field sizes ("depth_num_blocks" -> "depth"), None for shared fields."""
    head = name.split("_", 1)[0]
    return head if head in _KNOWN_MODALITIES else None


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
    """Stem + class token + position embedding (RGBDTPreprocessor / AudioPreprocessor).

    ``stem_name`` is the attribute the stem lives under, so the state-dict key is Meta's: its
    RGBDTPreprocessor keeps an RGB (and audio) stem as ``rgbt_stem`` but a depth stem as ``depth_stem``.
    """

    def __init__(self, stem: _PatchStem, num_patches: int, dim: int, stem_name: str = "rgbt_stem") -> None:
        super().__init__()
        self.stem_name = stem_name
        self.add_module(stem_name, stem)
        self.num_patches = num_patches
        self.pos_embedding_helper = _PosEmbedding(1 + num_patches, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        with torch.no_grad():  # OpenCLIP-style init, as the original
            nn.init.normal_(self.pos_embedding_helper.pos_embed).mul_(dim**-0.5)
            nn.init.normal_(self.cls_token).mul_(dim**-0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = getattr(self, self.stem_name)(x)
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

    def __init__(
        self, dim: int, num_blocks: int, num_heads: int, pre_ln: bool, add_bias_kv: bool, drop_path: float
    ) -> None:
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


def _postprocessor(logit_scale: float | None) -> nn.Module:
    # Vision's postprocessor is a bare Normalize (key-less); the others are Sequential(Normalize,
    # scaling), which is why their buffer is named "...<modality>.1.log_logit_scale".
    if logit_scale is None:
        return _L2Normalize()
    return nn.Sequential(_L2Normalize(), _FixedLogitScale(logit_scale))


# --------------------------------------------------------------------------------------------------
# The per-modality table: everything that differs between ImageBind's branches.
# --------------------------------------------------------------------------------------------------
def _vision_stem(cfg: ImageBindConfig) -> _PatchStem:
    k = cfg.vision_kernel_size
    return _PatchStem(
        nn.Sequential(
            _PadIm2Video(_VIDEO_FRAMES),
            nn.Conv3d(3, cfg.vision_embed_dim, kernel_size=k, stride=k, bias=False),
        )
    )


def _conv2d_stem(channels: int, dim: int, kernel: int, stride: int) -> _PatchStem:
    """Bias-free Conv2d then LayerNorm with torch's default eps, the audio and depth stems of the original."""
    return _PatchStem(
        nn.Conv2d(channels, dim, kernel_size=kernel, stride=stride, bias=False), norm_layer=nn.LayerNorm(dim)
    )


@dataclass(frozen=True)
class _ModalitySpec:
    """One ImageBind branch. The trunk's width, depth and heads are the config's ``<name>_embed_dim``,
    ``<name>_num_blocks`` and ``<name>_num_heads``; the rest is here."""

    stem: Callable[[ImageBindConfig], _PatchStem]
    stem_name: str  # the preprocessor attribute the stem lives under in Meta's state dict
    patch_layout: Callable[[ImageBindConfig], tuple[int, ...]]
    channels: int  # input channels of one item
    spatial: Callable[[ImageBindConfig], tuple[int, int]]  # one item's trailing two sizes
    ndims: tuple[int, ...]  # accepted input ranks; >= 5 means a clip axis to average over
    empty_shape: Callable[[ImageBindConfig], tuple[int, ...]]  # a zero-item batch (see empty_input)
    describe: Callable[[ImageBindConfig], str]  # the accepted shapes, for error messages
    pre_ln: bool  # LayerNorm before the blocks
    add_bias_kv: bool
    drop_path_field: str | None  # config field with the trunk's stochastic-depth rate (None: 0)
    logit_scale: float | None  # fixed scale after the L2 norm (None: none)

    def drop_path(self, cfg: ImageBindConfig) -> float:
        return float(getattr(cfg, self.drop_path_field)) if self.drop_path_field else 0.0


def _square(cfg: ImageBindConfig) -> tuple[int, int]:
    return (cfg.image_size, cfg.image_size)


_SPECS: dict[str, _ModalitySpec] = {
    # ViT-H/14 over a 2-frame clip (an image is repeated); no bias_kv, no drop path, pre-LN, no scale.
    "vision": _ModalitySpec(
        stem=_vision_stem,
        stem_name="rgbt_stem",
        patch_layout=lambda c: c.vision_patch_layout,
        channels=3,
        spatial=_square,
        ndims=(4, 5, 6),
        empty_shape=lambda c: (0, 3, c.image_size, c.image_size),
        describe=lambda c: (
            f"(B,3,{c.image_size},{c.image_size}) images or (B,S,3,T,{c.image_size},{c.image_size}) clips"
        ),
        pre_ln=True,
        add_bias_kv=False,
        drop_path_field=None,
        logit_scale=None,
    ),
    # ViT-B over a (mel x frames) log-mel spectrogram, overlapping 16x16 patches at stride 10.
    "audio": _ModalitySpec(
        stem=lambda c: _conv2d_stem(1, c.audio_embed_dim, c.audio_kernel_size, c.audio_stride),
        stem_name="rgbt_stem",
        patch_layout=lambda c: c.audio_patch_layout,
        channels=1,
        spatial=lambda c: (c.audio_num_mel_bins, c.audio_target_len),
        ndims=(4, 5),
        empty_shape=lambda c: (0, 1, 1, c.audio_num_mel_bins, c.audio_target_len),
        describe=lambda c: f"(B,S,1,{c.audio_num_mel_bins},{c.audio_target_len}) spectrogram clips",
        pre_ln=False,
        add_bias_kv=True,
        drop_path_field="audio_drop_path",
        logit_scale=_AUDIO_LOGIT_SCALE,
    ),
    # ViT-S over a single-channel 224^2 disparity map, non-overlapping 16x16 patches.
    "depth": _ModalitySpec(
        stem=lambda c: _conv2d_stem(1, c.depth_embed_dim, c.depth_kernel_size, c.depth_kernel_size),
        stem_name="depth_stem",
        patch_layout=lambda c: c.depth_patch_layout,
        channels=1,
        spatial=_square,
        ndims=(4, 5),
        empty_shape=lambda c: (0, 1, c.image_size, c.image_size),
        describe=lambda c: (
            f"(B,1,{c.image_size},{c.image_size}) depth maps or "
            f"(B,S,1,{c.image_size},{c.image_size}) stacks of them"
        ),
        pre_ln=False,
        add_bias_kv=True,
        drop_path_field="depth_drop_path",
        logit_scale=_DEPTH_LOGIT_SCALE,
    ),
}
assert tuple(_SPECS) == _KNOWN_MODALITIES


# --------------------------------------------------------------------------------------------------
class ImageBindModel(nn.Module):
    """The branches ``cfg.modalities`` lists (default vision and audio) with Meta's state-dict layout."""

    def __init__(self, cfg: ImageBindConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.modalities = cfg.modalities
        specs = {m: _SPECS[m] for m in cfg.modalities}
        dims = {m: getattr(cfg, f"{m}_embed_dim") for m in specs}
        # One part at a time over all branches (all stems first), as the original: the order modules
        # are created in is the order they draw their random init in, so a seed gives the same model.
        stems = {m: s.stem(cfg) for m, s in specs.items()}
        self.modality_preprocessors = nn.ModuleDict(
            {
                m: _TokenPreprocessor(stems[m], math.prod(s.patch_layout(cfg)), dims[m], s.stem_name)
                for m, s in specs.items()
            }
        )
        self.modality_trunks = nn.ModuleDict(
            {
                m: _Trunk(
                    dims[m],
                    getattr(cfg, f"{m}_num_blocks"),
                    getattr(cfg, f"{m}_num_heads"),
                    pre_ln=s.pre_ln,
                    add_bias_kv=s.add_bias_kv,
                    drop_path=s.drop_path(cfg),
                )
                for m, s in specs.items()
            }
        )
        self.modality_heads = nn.ModuleDict({m: _head(dims[m], cfg.out_embed_dim) for m in specs})
        self.modality_postprocessors = nn.ModuleDict(
            {m: _postprocessor(s.logit_scale) for m, s in specs.items()}
        )

    @property
    def embed_dim(self) -> int:
        """Width of the joint embedding space (``cfg.out_embed_dim``)."""
        return self.cfg.out_embed_dim

    def _spec(self, modality: str) -> _ModalitySpec:
        if modality not in _SPECS:
            raise ValueError(f"unknown ImageBind modality {modality!r}; expected one of {self.modalities}")
        if modality not in self.modalities:
            raise ValueError(
                f"ImageBind modality {modality!r} is not built by this configuration (modalities="
                f"{self.modalities}); add it to the encoder's arch.modalities"
            )
        return _SPECS[modality]

    def empty_input(self, modality: str) -> torch.Tensor:
        """A batch of zero items of ``modality``: running it costs nothing, but the trunk's modules
        still run, so data-parallel ranks without that modality run the same modules as the rest."""
        shape = self._spec(modality).empty_shape(self.cfg)
        ref = self.modality_heads[modality][2].weight
        return torch.zeros(shape, device=ref.device, dtype=ref.dtype)

    def _check_input(self, modality: str, x: torch.Tensor) -> None:
        spec = self._spec(modality)
        item = x.shape[2:] if x.ndim >= 5 else x.shape[1:]
        ok = x.ndim in spec.ndims and item[0] == spec.channels and tuple(item[-2:]) == spec.spatial(self.cfg)
        if not ok:
            raise ValueError(
                f"ImageBind {modality} input has shape {tuple(x.shape)}; expected {spec.describe(self.cfg)}"
            )

    def encode(self, modality: str, x: torch.Tensor, *, renormalize: bool = False) -> torch.Tensor:
        """Embed one modality: (B, out_embed_dim), the output NExT-GPT feeds to its input projection.

        x: vision (B,3,H,W) image, or (B,S,3,T,H,W) video clips/crops; audio (B,S,1,mel,frames);
        depth (B,1,H,W) disparity maps (:func:`nextgpt.encoders.preprocess.load_depth`), or (B,S,1,H,W).
        Per item the output is L2-normalised (audio / depth: then times the fixed logit scale 20 / 5,
        as the original postprocessors). With a clip axis S (``x.ndim >= 5``, the original's rule)
        the per-clip outputs are averaged and, as in the original forward, *not* renormalised, so
        video norms are <= 1 and audio norms <= 20. ``renormalize=True`` L2-normalises the final
        vector instead.
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

    # model.encoder.renormalize (load_encoder sets it): the project L2-normalises every feature it
    # feeds the input projector; the original (false) feeds the postprocessed output as it is:
    # audio x 20, and clip averages of unit vectors (norm <= 1) for video
    renormalize_features: bool = True

    def features(self, modality: str, x: torch.Tensor) -> torch.Tensor:
        """What NExT-GPT feeds its input projector: :meth:`encode`, renormalised or not by
        ``model.encoder.renormalize``. Training, the feature caches and generation all call this."""
        return self.encode(modality, x, renormalize=self.renormalize_features)

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Dict in, dict out, like the original ``ImageBindModel.forward``."""
        return {m: self.encode(m, x) for m, x in inputs.items() if x is not None}


# --------------------------------------------------------------------------------------------------
class ImageBindCheckpointError(RuntimeError):
    """The ImageBind weights file is missing, unreadable, or does not fit the configuration."""


_PARTS = ("modality_preprocessors", "modality_trunks", "modality_heads", "modality_postprocessors")
_MAX_LISTED = 10


def _prefixes(modalities: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(f"{part}.{m}." for part in _PARTS for m in modalities)


_ALL_PREFIXES = _prefixes(_KNOWN_MODALITIES)


def _listing(title: str, entries: list[str]) -> str:
    more = f"\n    ... and {len(entries) - _MAX_LISTED} more" if len(entries) > _MAX_LISTED else ""
    return f"\n  {title} ({len(entries)}):\n    " + "\n    ".join(entries[:_MAX_LISTED]) + more


def _unwrap(obj: Any) -> Any:
    """Accept a bare state dict or one nested under "model"/"state_dict"/"module"."""
    for key in ("model", "state_dict", "module"):
        if (
            isinstance(obj, Mapping)
            and key in obj
            and isinstance(obj[key], Mapping)
            and not any(isinstance(k, str) and k.startswith(_ALL_PREFIXES) for k in obj)
        ):
            obj = obj[key]
    return obj


def _absent_modalities(p: Path, cfg: ImageBindConfig, ours: Mapping[str, Any]) -> None:
    """A branch the config builds but the checkpoint has no key of at all gets its own message: the
    usual cause is a checkpoint saved from a model without it (e.g. a vision+audio tiny build)."""
    absent = [m for m in cfg.modalities if not any(k.startswith(_prefixes((m,))) for k in ours)]
    if absent:
        have = [m for m in cfg.modalities if m not in absent]
        raise ImageBindCheckpointError(
            f"ImageBind checkpoint {p} has no {'/'.join(absent)} weights (no modality_*.{absent[0]}.* keys) but "
            f"the configuration builds {', '.join(absent)} (modalities={cfg.modalities}); drop "
            f"{', '.join(repr(m) for m in absent)} from the encoder's arch.modalities, or use a checkpoint that has "
            f"it (Meta's imagebind_huge.pth holds vision, audio and depth; this one holds {'/'.join(have)})"
        )


def load_imagebind(
    path: str | os.PathLike, cfg: ImageBindConfig, *, dtype: torch.dtype = torch.float32
) -> ImageBindModel:
    """Load Meta's ``imagebind_huge.pth`` (or a state dict saved from this class) into a frozen model.

    The check is strict over the keys of the branches ``cfg.modalities`` builds (missing,
    unexpected or wrongly shaped entries all fail, with the path and up to 10 offending keys in the
    message; a built branch with no key at all in the file is named as such); keys of other
    modalities are ignored. The model is built on the meta device and the checkpoint tensors are
    assigned, so no random init of a 1B-parameter model is paid. Returns it in eval mode,
    requires_grad False, in dtype.
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
        raise ImageBindCheckpointError(
            f"ImageBind checkpoint {p} holds a {type(state).__name__}, not a state dict"
        )
    wanted = _prefixes(cfg.modalities)
    names = "/".join(cfg.modalities)
    ours = {k: v for k, v in state.items() if isinstance(k, str) and k.startswith(wanted)}
    if not ours:
        sample = ", ".join(map(str, list(state)[:5])) or "<empty>"
        raise ImageBindCheckpointError(f"ImageBind checkpoint {p} has no {names} keys (first keys: {sample})")
    _absent_modalities(p, cfg, ours)

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
            msg += _listing(f"unexpected {names} keys", unexpected)
        if not_tensor:
            msg += _listing("non-tensor values", not_tensor)
        raise ImageBindCheckpointError(msg)

    model.load_state_dict(ours, strict=True, assign=True)
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:  # cannot happen with a strict load; guards future non-persistent buffers
        raise ImageBindCheckpointError(
            f"ImageBind checkpoint {p}: tensors left uninitialised: {leftover[:_MAX_LISTED]}"
        )
    model = model.to(dtype=dtype)
    model.requires_grad_(False)
    return model.eval()
