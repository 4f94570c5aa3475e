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

The configuration is :mod:`nextgpt.encoders.imagebind_config`; the building blocks and the
per-modality table, :mod:`nextgpt.encoders.imagebind_layers`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from nextgpt.encoders.imagebind_config import BRANCHES, ImageBindConfig
from nextgpt.encoders.imagebind_layers import (
    SPECS,
    ModalitySpec,
    TokenPreprocessor,
    Trunk,
    build_head,
    build_postprocessor,
)

__all__ = [
    "ImageBindCheckpointError",
    "ImageBindModel",
    "load_imagebind",
]


class ImageBindModel(nn.Module):
    """The branches ``cfg.modalities`` lists (default vision and audio) with Meta's state-dict layout."""

    def __init__(self, cfg: ImageBindConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.modalities = cfg.modalities
        specs = {m: SPECS[m] for m in cfg.modalities}
        dims = {m: getattr(cfg, f"{m}_embed_dim") for m in specs}
        # One part at a time over all branches (all stems first), as the original: the order modules
        # are created in is the order they draw their random init in, so a seed gives the same model.
        stems = {m: s.stem(cfg) for m, s in specs.items()}
        self.modality_preprocessors = nn.ModuleDict(
            {
                m: TokenPreprocessor(stems[m], math.prod(s.patch_layout(cfg)), dims[m], s.stem_name)
                for m, s in specs.items()
            }
        )
        self.modality_trunks = nn.ModuleDict(
            {
                m: Trunk(
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
        self.modality_heads = nn.ModuleDict({m: build_head(dims[m], cfg.out_embed_dim) for m in specs})
        self.modality_postprocessors = nn.ModuleDict(
            {m: build_postprocessor(s.logit_scale) for m, s in specs.items()}
        )

    @property
    def embed_dim(self) -> int:
        """Width of the joint embedding space (``cfg.out_embed_dim``)."""
        return self.cfg.out_embed_dim

    def _spec(self, modality: str) -> ModalitySpec:
        if modality not in SPECS:
            raise ValueError(f"unknown ImageBind modality {modality!r}; expected one of {self.modalities}")
        if modality not in self.modalities:
            raise ValueError(
                f"ImageBind modality {modality!r} is not built by this configuration (modalities="
                f"{self.modalities}); add it to the encoder's arch.modalities"
            )
        return SPECS[modality]

    def _head_weight(self, modality: str) -> torch.Tensor:
        """The head's Linear weight: the device and dtype a branch runs in."""
        return cast(nn.Linear, cast(nn.Sequential, self.modality_heads[modality])[2]).weight

    def empty_input(self, modality: str) -> torch.Tensor:
        """A batch of zero items of ``modality``: running it costs nothing, but the trunk's modules
        still run, so data-parallel ranks without that modality run the same modules as the rest."""
        shape = self._spec(modality).empty_shape(self.cfg)
        ref = self._head_weight(modality)
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
        ref = self._head_weight(modality)
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


_ALL_PREFIXES = _prefixes(BRANCHES)


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


def _absent_modalities(p: Path, cfg: ImageBindConfig, ours: Mapping[str, torch.Tensor]) -> None:
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
