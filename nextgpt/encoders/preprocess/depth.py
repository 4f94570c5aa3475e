"""Depth maps for ImageBind's depth branch (Omnivore's disparity recipe; see :func:`load_depth`)."""

from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from nextgpt.encoders.preprocess.common import (
    IMAGE_SIZE,
    MediaDecodeError,
    MediaSource,
    Source,
    existing_source,
)
from nextgpt.encoders.preprocess.image import center_crop_offsets, resize_size

# --------------------------------------------------------------------------------------------------
# depth
# --------------------------------------------------------------------------------------------------
# Omnivore's statistics of its depth channel after DepthNorm (omnivore/predict.py, the RGBD eval transform).
DEPTH_MEAN = 0.0418
DEPTH_STD = 0.0295
# Kinect v1 (NYU Depth v2, SUN RGB-D "kv1"): focal length fx in pixels and stereo baseline in metres.
KINECT_FOCAL_LENGTH = 518.857901
KINECT_BASELINE = 0.075
_MIN_DISPARITY = 0.01  # DepthNorm's floor (its "min_depth", applied to the disparity)
_NPY_MAGIC = b"\x93NUMPY"
_DEPTH_ENCODINGS = ("depth", "disparity", "relative")


def _read_head(p: Source, n: int) -> bytes:
    if p.data is not None:
        return p.data[:n]
    assert p.path is not None  # a Source without bytes has a path
    with open(p.path, "rb") as f:
        return f.read(n)


def _decode_npy(p: Source) -> np.ndarray:
    src = io.BytesIO(p.data) if p.data is not None else str(p.path)
    try:
        arr = np.load(src, allow_pickle=False)
    except Exception as e:  # truncated header or data, pickled objects, ...
        raise MediaDecodeError(p.label, f"not a readable .npy array ({type(e).__name__}: {e})") from e
    if not isinstance(arr, np.ndarray) or not (
        np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)
    ):
        raise MediaDecodeError(
            p.label,
            f"depth array has dtype {getattr(arr, 'dtype', type(arr).__name__)}, expected integers or floats",
        )
    return arr


def _decode_depth_image(p: Source) -> np.ndarray:
    """A single-channel image as its stored numbers: uint8, uint16 (16-bit PNG), int32 or float32."""
    try:
        with Image.open(p.open()) as im:
            im.load()  # forces the full decode: truncated files fail here
            mode = im.mode
            if mode in ("1", "L", "LA", "P", "PA", "RGB", "RGBA"):
                rgb = np.asarray(im.convert("RGB"))
                if not ((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()):
                    # A colour-mapped visualisation can not be turned back into depth values.
                    raise MediaDecodeError(
                        p.label,
                        f"depth image is in colour (mode {mode}, channels differ); "
                        "expected a single-channel depth map",
                    )
                arr = rgb[..., 0].copy()
            elif mode.startswith("I;16") or mode in ("I", "F"):
                arr = np.asarray(im).copy()
            else:
                raise MediaDecodeError(
                    p.label, f"depth image has mode {mode}; expected a single-channel image"
                )
    except MediaDecodeError:
        raise
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, UnidentifiedImageError, ...
        raise MediaDecodeError(p.label, f"not a readable depth image ({type(e).__name__}: {e})") from e
    if mode.startswith("I;16"):
        arr = arr.astype(np.uint16)  # native order for big-endian "I;16B"
    return arr


def _as_map(p: Source, arr: np.ndarray) -> np.ndarray:
    """(H, W), (1, H, W) or (H, W, 1) -> (H, W); anything else, empty or non-finite maps fail."""
    if arr.ndim == 3 and 1 in (arr.shape[0], arr.shape[-1]):
        arr = arr[0] if arr.shape[0] == 1 else arr[..., 0]
    if arr.ndim != 2:
        raise MediaDecodeError(
            p.label, f"depth map has shape {arr.shape}; expected (H, W), (1, H, W) or (H, W, 1)"
        )
    if min(arr.shape) < 1:
        raise MediaDecodeError(p.label, f"depth map has size {arr.shape[1]}x{arr.shape[0]}")
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        raise MediaDecodeError(p.label, "depth map holds NaN or infinite values")
    return arr


def _full_scale(dtype: np.dtype) -> float:
    """What value means "1.0" in a relative map: the largest value of a uint8 / 16-bit integer map, 1 for floats."""
    if dtype == np.uint8:
        return 255.0
    return 65535.0 if np.issubdtype(dtype, np.integer) else 1.0


def _normalized_disparity(
    values: np.ndarray,
    encoding: str,
    *,
    depth_scale: float,
    focal_length: float,
    baseline: float,
    min_depth: float,
    max_depth: float,
    max_disparity: float,
) -> torch.Tensor:
    """Per pixel, DepthNorm's output: disparity clamped to [0.01, max_disparity], divided by max_disparity."""
    x = torch.from_numpy(values.astype(np.float32))
    if encoding == "relative":  # already disparity / max_disparity, up to the file's full scale
        return (x / _full_scale(values.dtype)).clamp_(_MIN_DISPARITY / max_disparity, 1.0)
    if encoding == "depth":
        if np.issubdtype(values.dtype, np.integer):
            x = x / depth_scale  # -> metres
        # Omnivore's conversion: clip the depth (missing pixels, 0, become min_depth, i.e. nearest),
        # then disparity = baseline * focal length / depth, in pixels.
        x = (baseline * focal_length) / x.clamp_(min_depth, max_depth)
    return x.clamp_(_MIN_DISPARITY, max_disparity) / max_disparity


def _resize_center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """(H, W) -> (size, size): load_image's geometry (torchvision Resize(size) + CenterCrop(size)),
    resampled bilinearly without antialiasing, as torchvision's Resize does on a tensor (Omnivore
    resizes the depth channel as a tensor)."""
    h, w = x.shape
    new_w, new_h = resize_size(w, h, size)
    if (new_w, new_h) != (w, h):
        x = F.interpolate(
            x[None, None], size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=False
        )[0, 0]
    left, top = center_crop_offsets(new_w, new_h, size)
    return x[top : top + size, left : left + size]


def load_depth(
    path: MediaSource,
    *,
    name: str | None = None,
    encoding: str | None = None,
    depth_scale: float = 1000.0,
    focal_length: float = KINECT_FOCAL_LENGTH,
    baseline: float = KINECT_BASELINE,
    min_depth: float = 0.01,
    max_depth: float = 50.0,
    max_disparity: float = 75.0,
    mean: float = DEPTH_MEAN,
    std: float = DEPTH_STD,
    size: int = IMAGE_SIZE,
) -> torch.Tensor:
    """(1, 224, 224) float32 normalised disparity, the input of ImageBind's depth branch.

    What Meta does: ImageBind's ``data.py`` has no depth loader (its issues #14, #69, #122 and #134
    ask for one). The paper treats depth as a one-channel image and, following Omnivore, converts it
    to disparity "for scale normalization"; the depth encoder was trained on SUN RGB-D. Omnivore
    (same group) published both halves: the SUN RGB-D conversion (omnivore issue #12: 16-bit PNG in
    millimetres / 1000 -> metres, clipped to [0.01, 50], disparity = baseline * fx / depth, baseline
    0.075 m for Kinect, 0.095 m for RealSense / Xtion, fx from the scene's intrinsics.txt) and its
    eval transform (``omnivore/predict.py``: ``DepthNorm(max_depth=75, clamp_max_before_scale=True)``
    = clamp to [0.01, 75] and divide by 75, ``Resize(224)``, ``CenterCrop(224)``, normalise with mean
    0.0418 / std 0.0295). This function is that pipeline, in that order.

    Where we chose (Meta publishes nothing on these):

    * ``encoding``: what the numbers in the file are. ``"depth"``: metric depth, integers in units of
      ``1 / depth_scale`` m (default millimetres, the Kinect / NYU / SUN RGB-D convention), floats in
      metres. ``"disparity"``: already ``baseline * fx / depth`` in pixels (e.g. Omnivore's saved
      disparity). ``"relative"``: a normalised inverse-depth map (near = bright, as DPT / MiDaS /
      Depth-Anything outputs are saved), full scale (255, 65535, or 1.0 for floats) read as
      disparity = ``max_disparity``, i.e. the value / full scale *is* DepthNorm's output. ``None``
      (default): 8-bit images are "relative" (they can not hold metric depth), everything else
      (16-bit PNG, ``I`` / ``F`` images, ``.npy``) is "depth".
    * ``focal_length`` / ``baseline`` default to Kinect v1 (fx 518.857901 px, 0.075 m); pass the
      sensor's own for metric depth from other cameras.
    * Resampling: bilinear without antialiasing (torchvision's tensor ``Resize`` as Omnivore applied
      it), on :func:`load_image`'s geometry (short side 224 by torchvision's size rule, centre crop).
    * Missing pixels (0 in sensor depth) are not masked: like Omnivore's code they clip to
      ``min_depth`` and so read as the nearest disparity.
    * Whether ImageBind's training applied Omnivore's final mean / std is not published (users in
      ImageBind issue #107 report results a few points under the paper's with it); ``mean=0, std=1``
      leaves DepthNorm's [0, 1] output as is. SUN RGB-D's PNGs store depth with its bits rotated
      (the toolbox's ``(v >> 3) | (v << 13)``); Omnivore's snippet reads the raw value, and so does this.

    Input: a PNG / TIFF / other Pillow image (colour-mapped visualisations are rejected) or a ``.npy``
    array ((H, W), (1, H, W) or (H, W, 1)), by path, bytes or file object; unreadable input raises
    :class:`MediaDecodeError` naming it.
    """
    if encoding not in (None, *_DEPTH_ENCODINGS):
        raise ValueError(f"unknown depth encoding {encoding!r}; expected one of {_DEPTH_ENCODINGS} or None")
    if not (
        0 < min_depth < max_depth
        and depth_scale > 0
        and focal_length > 0
        and baseline > 0
        and max_disparity > 0
        and std > 0
    ):
        raise ValueError(
            "load_depth needs 0 < min_depth < max_depth and positive depth_scale, focal_length, "
            "baseline, max_disparity and std"
        )
    p = existing_source(path, name)
    raw = _decode_npy(p) if _read_head(p, len(_NPY_MAGIC)) == _NPY_MAGIC else _decode_depth_image(p)
    values = _as_map(p, raw)
    if encoding is None:
        encoding = "relative" if values.dtype == np.uint8 else "depth"
    disparity = _normalized_disparity(
        values,
        encoding,
        depth_scale=depth_scale,
        focal_length=focal_length,
        baseline=baseline,
        min_depth=min_depth,
        max_depth=max_depth,
        max_disparity=max_disparity,
    )
    x = _resize_center_crop(disparity, size)
    return ((x - mean) / std).unsqueeze(0).contiguous()
