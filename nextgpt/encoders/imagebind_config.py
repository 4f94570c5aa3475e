"""The ImageBind encoder's configuration: the sizes of its branches (vision, audio, depth) and which of
them a model builds. Plain data, no torch: a run's config validates it and the feature caches
fingerprint its ``repr``; :mod:`nextgpt.encoders.imagebind` builds the model it describes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import MISSING, dataclass, fields
from typing import Any

# The original pads a single image to this many frames ("PadIm2Video(ntimes=2)") and builds the vision
# position embedding for a video of this length (``video_frames=2``).
VIDEO_FRAMES = 2
# Every branch the model can build (a checkpoint may hold them all), in the order Meta's ImageBindModel
# creates them (also the order modules are created in, so a vision+audio model draws the same random
# init as before depth existed).
BRANCHES = ("vision", "audio", "depth")
_DEFAULT_MODALITIES = ("vision", "audio")


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
        for prefix in BRANCHES:
            dim, heads = getattr(self, f"{prefix}_embed_dim"), getattr(self, f"{prefix}_num_heads")
            if dim % heads:
                raise ValueError(f"{prefix}_embed_dim={dim} is not divisible by {prefix}_num_heads={heads}")
        if ks[0] > VIDEO_FRAMES or ks[1] > self.image_size or ks[2] > self.image_size:
            raise ValueError(
                f"vision_kernel_size {ks} does not fit a {VIDEO_FRAMES}x{self.image_size}^2 clip"
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
        """(T, H, W) grid of the Conv3d stem for a ``VIDEO_FRAMES``-frame ``image_size`` clip."""
        kt, kh, kw = self.vision_kernel_size
        return (
            _conv_out(VIDEO_FRAMES, kt, kt),
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
    unknown = [n for n in names if n not in BRANCHES]
    if unknown:
        raise ValueError(
            f"ImageBindConfig.modalities: unknown modality {unknown[0]!r} (known: {', '.join(BRANCHES)})"
        )
    if len(set(names)) != len(names):
        raise ValueError(f"ImageBindConfig.modalities lists a modality twice: {list(names)}")
    if not names:
        raise ValueError("ImageBindConfig.modalities must list at least one modality")
    return tuple(m for m in BRANCHES if m in names)


def _field_modality(name: str) -> str | None:
    """The branch a config field sizes ("depth_num_blocks" -> "depth"), None for shared fields."""
    head = name.split("_", 1)[0]
    return head if head in BRANCHES else None


def _conv_out(size: int, kernel: int, stride: int) -> int:
    return (size - kernel) // stride + 1
