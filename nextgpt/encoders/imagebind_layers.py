"""ImageBind's building blocks and the per-modality table (:data:`SPECS`): everything that differs between
its branches. Module attribute names are chosen so that state-dict keys equal Meta's;
:class:`nextgpt.encoders.imagebind.ImageBindModel` assembles the branches from these parts.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nextgpt.encoders.imagebind_config import BRANCHES, VIDEO_FRAMES, ImageBindConfig

# LearnableLogitScaling(logit_scale_init=..., learnable=False, max_logit_scale=100) of the audio / depth branches.
_AUDIO_LOGIT_SCALE = 20.0
_DEPTH_LOGIT_SCALE = 5.0
_MAX_LOGIT_SCALE = 100.0
_LN_EPS = 1e-6  # every LayerNorm of the trunks and heads; the audio stem's LayerNorm uses the default
_MLP_RATIO = 4


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


class TokenPreprocessor(nn.Module):
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


class Trunk(nn.Module):
    """SimpleTransformer: optional pre-LN, blocks in (L, B, D) layout, back to (B, L, D)."""

    def __init__(
        self, dim: int, num_blocks: int, num_heads: int, pre_ln: bool, add_bias_kv: bool, drop_path: float
    ) -> None:
        super().__init__()
        self.pre_transformer_layer = nn.Sequential(
            nn.LayerNorm(dim, eps=_LN_EPS) if pre_ln else nn.Identity(), _SeqFirst()
        )
        rates = [r.item() for r in torch.linspace(0, drop_path, num_blocks, device="cpu")]  # "progressive"
        blocks = [_Block(dim, num_heads, add_bias_kv, r) for r in rates]
        self.blocks = nn.Sequential(*blocks)
        self.post_transformer_layer = _SeqFirst()
        self.apply(self._init_weights)
        for blk in blocks:  # re-init what apply() does not reach, as nn.MultiheadAttention does
            if blk.attn.bias_k is not None and blk.attn.bias_v is not None:  # add_bias_kv makes both
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

    log_logit_scale: torch.Tensor  # a buffer

    def __init__(self, init: float) -> None:
        super().__init__()
        self.register_buffer("log_logit_scale", torch.ones([]) * math.log(init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clip(self.log_logit_scale.exp(), max=_MAX_LOGIT_SCALE) * x


def build_head(dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(dim, eps=_LN_EPS), _SelectCls(), nn.Linear(dim, out_dim, bias=False))


def build_postprocessor(logit_scale: float | None) -> nn.Module:
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
            _PadIm2Video(VIDEO_FRAMES),
            nn.Conv3d(3, cfg.vision_embed_dim, kernel_size=k, stride=k, bias=False),
        )
    )


def _conv2d_stem(channels: int, dim: int, kernel: int, stride: int) -> _PatchStem:
    """Bias-free Conv2d then LayerNorm with torch's default eps, the audio and depth stems of the original."""
    return _PatchStem(
        nn.Conv2d(channels, dim, kernel_size=kernel, stride=stride, bias=False), norm_layer=nn.LayerNorm(dim)
    )


@dataclass(frozen=True)
class ModalitySpec:
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


SPECS: dict[str, ModalitySpec] = {
    # ViT-H/14 over a 2-frame clip (an image is repeated); no bias_kv, no drop path, pre-LN, no scale.
    "vision": ModalitySpec(
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
    "audio": ModalitySpec(
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
    "depth": ModalitySpec(
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
assert tuple(SPECS) == BRANCHES
