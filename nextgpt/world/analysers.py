"""The world's attributes read back from media by plain signal processing.

These score generated media by what they show: no learned metric, nothing to train, the same
numbers on any machine. Each analyser is checked against the generator's own items (whose
captions are true by construction) in ``tests/unit/test_world.py``.

- image: every pixel is given to the nearest colour of the palette (the world's colours and its
  backgrounds); the world colour with the most pixels is the colour, the centroid of its pixels
  the position (nearest of the five centres, scaled to the image size) and their fill of their
  bounding box the shape (circle pi/4, square 1, triangle 1/2).
- audio: the peak of the magnitude spectrum is the pitch (nearest in octaves), the peak amplitude
  the loudness (between the quiet and loud ranges), and the share of 10 ms frames near silence
  the pattern (a beeping tone is silent half the time).
- video: per frame, the pixels far from the background; their mean colour is the colour and the
  track of their centroid, first frame to last, the direction.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import soundfile as sf
from PIL import Image

from nextgpt.world.synthetic import (
    BACKGROUNDS,
    COLOURS,
    IMAGE_SIZE,
    LOUDNESS,
    PITCHES,
    POSITIONS,
    SAMPLE_RATE,
    SHAPES,
    VIDEO_BG,
)

_WORLD = np.array(list(COLOURS.values()), dtype=np.float32)
_PALETTE = np.concatenate([_WORLD, np.array(list(BACKGROUNDS.values()) + [VIDEO_BG], dtype=np.float32)])
_FILL = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}
# between the loud range's low end and the quiet range's high end, in octaves (geometric middle)
_LOUD_THRESHOLD = math.sqrt(LOUDNESS["quiet"][1] * LOUDNESS["loud"][0])


def _nearest(value: float, options: dict[str, float]) -> str:
    return min(options, key=lambda k: abs(options[k] - value))


def image_attributes(image: np.ndarray) -> dict[str, str | None]:
    """colour, shape and position of the dominant shape of an RGB image (H, W, 3), any size."""
    rgb = np.asarray(image, dtype=np.float32)[..., :3]
    h, w = rgb.shape[:2]
    nearest = np.argmin(((rgb[:, :, None, :] - _PALETTE[None, None]) ** 2).sum(-1), axis=-1)
    counts = np.bincount(nearest.ravel(), minlength=len(_PALETTE))[: len(_WORLD)]
    if counts.max() == 0:
        return {"colour": None, "shape": None, "position": None}
    k = int(counts.argmax())
    ys, xs = np.nonzero(nearest == k)
    cx, cy = xs.mean() * IMAGE_SIZE / w, ys.mean() * IMAGE_SIZE / h
    position = min(POSITIONS, key=lambda p: (POSITIONS[p][1][0] - cx) ** 2 + (POSITIONS[p][1][1] - cy) ** 2)
    box = (xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1)
    fill = len(xs) / box
    shape = min(SHAPES, key=lambda s: abs(_FILL[s] - fill))
    return {"colour": list(COLOURS)[k], "shape": shape, "position": position}


def audio_attributes(wave: np.ndarray, sample_rate: int = SAMPLE_RATE) -> dict[str, str | None]:
    """pitch, loudness and pattern of a mono tone."""
    x = (
        np.asarray(wave, dtype=np.float64).reshape(-1)
        if np.ndim(wave) == 1
        else np.asarray(wave, np.float64).mean(-1)
    )
    if x.size < 64 or not np.isfinite(x).all() or np.abs(x).max() == 0:
        return {"pitch": None, "loudness": None, "pattern": None}
    spectrum = np.abs(np.fft.rfft(x * np.hanning(x.size)))
    freqs = np.fft.rfftfreq(x.size, 1.0 / sample_rate)
    peak = float(freqs[int(spectrum[1:].argmax()) + 1])
    pitch = _nearest(math.log2(max(peak, 1.0)), {k: math.log2(v) for k, v in PITCHES.items()})
    loudness = "loud" if np.abs(x).max() >= _LOUD_THRESHOLD else "quiet"
    frame = max(1, sample_rate // 100)
    n = x.size // frame
    rms = np.sqrt((x[: n * frame].reshape(n, frame) ** 2).mean(1)) if n else np.array([0.0])
    silent = float((rms < 0.2 * rms.max()).mean()) if rms.max() > 0 else 1.0
    return {"pitch": pitch, "loudness": loudness, "pattern": "beeping" if silent > 0.25 else "steady"}


def video_attributes(frames: np.ndarray) -> dict[str, str | None]:
    """colour and direction of motion of the moving square in frames (T, H, W, 3)."""
    clip = np.asarray(frames, dtype=np.float32)[..., :3]
    if clip.ndim != 4 or len(clip) < 2:
        return {"colour": None, "direction": None}
    t, h, w = clip.shape[:3]
    background = np.median(clip.reshape(t, -1, 3), axis=1)  # per frame: the square covers a few % of it
    far = np.linalg.norm(clip - background[:, None, None, :], axis=-1) > 60
    tracked = [(i, np.nonzero(far[i])) for i in range(t) if far[i].sum() >= 4]
    if len(tracked) < 2:
        return {"colour": None, "direction": None}
    pixels = np.concatenate([clip[i][far[i]] for i, _ in tracked])
    colour = list(COLOURS)[int(((pixels.mean(0)[None] - _WORLD) ** 2).sum(-1).argmin())]
    (_, (y0, x0)), (_, (y1, x1)) = tracked[0], tracked[-1]
    dx, dy = (x1.mean() - x0.mean()) / w, (y1.mean() - y0.mean()) / h
    if abs(dx) >= abs(dy):
        direction = "right" if dx > 0 else "left"
    else:
        direction = "down" if dy > 0 else "up"
    return {"colour": colour, "direction": direction}


def read_image(path: str | Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def read_audio(path: str | Path) -> tuple[np.ndarray, int]:
    wave, rate = sf.read(str(path), dtype="float32", always_2d=False)
    return wave, int(rate)


def read_video(path: str | Path) -> np.ndarray:
    import av  # deferred: PyAV (FFmpeg) costs ~0.1 s to import; only reading a video needs it

    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def file_attributes(path: str | Path, modality: str) -> dict[str, str | None]:
    """The attributes of a media file of ``modality``."""
    if modality == "image":
        return image_attributes(read_image(path))
    if modality == "audio":
        return audio_attributes(*read_audio(path))
    if modality == "video":
        return video_attributes(read_video(path))
    raise ValueError(f"no world analyser for modality {modality!r}")
