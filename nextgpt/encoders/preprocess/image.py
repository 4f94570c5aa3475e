"""ImageBind's image transform: bicubic resize of the short side to 224, centre crop, CLIP mean/std."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from nextgpt.encoders.preprocess.common import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGE_SIZE,
    MediaDecodeError,
    MediaSource,
    existing_source,
    normalize_channels,
)


# --------------------------------------------------------------------------------------------------
# image
# --------------------------------------------------------------------------------------------------
def resize_size(w: int, h: int, size: int) -> tuple[int, int]:
    """torchvision ``Resize(size)`` (an int) output (width, height): short side ``size``, long side
    ``int(size * long / short)``."""
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    return (new_short, new_long) if w <= h else (new_long, new_short)


def center_crop_offsets(w: int, h: int, size: int) -> tuple[int, int]:
    """torchvision ``CenterCrop(size)`` (left, top): ``int(round((s - size) / 2))``."""
    return round((w - size) / 2.0), round((h - size) / 2.0)  # round() of a float is an int


def load_image(path: MediaSource, *, name: str | None = None) -> torch.Tensor:
    """(3, 224, 224) float32 as ImageBind's vision transform: RGB, bicubic short side 224, centre crop, CLIP norm."""
    p = existing_source(path, name)
    try:
        with Image.open(p.open()) as src:
            im = src.convert("RGB")  # forces the full decode: truncated files fail here
            w, h = im.size
            if w < 1 or h < 1:
                raise ValueError(f"image has size {w}x{h}")
            # torchvision Resize(int) size rule, then PIL bicubic resample (what torchvision uses on PIL)
            new_w, new_h = resize_size(w, h, IMAGE_SIZE)
            if (new_w, new_h) != (w, h):
                im = im.resize((new_w, new_h), Image.Resampling.BICUBIC)
            left, top = center_crop_offsets(new_w, new_h, IMAGE_SIZE)
            im = im.crop((left, top, left + IMAGE_SIZE, top + IMAGE_SIZE))
            arr = np.asarray(im, dtype=np.uint8).copy()
    except MediaDecodeError:
        raise
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, UnidentifiedImageError, ...
        raise MediaDecodeError(p.label, f"not a readable image ({type(e).__name__}: {e})") from e
    x = torch.from_numpy(arr).permute(2, 0, 1).float().div_(255.0)
    return normalize_channels(x, CLIP_MEAN, CLIP_STD, dim=0)
