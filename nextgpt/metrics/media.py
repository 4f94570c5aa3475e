"""Reading media for the metric networks: images as RGB, audio as mono float waveforms, video frames."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from PIL import Image


def read_image(path: str | Path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


def square_crop(image: Image.Image, size: int, resample: int = Image.Resampling.BICUBIC) -> Image.Image:
    """Resize the shorter side to ``size`` and crop the centre square (CLIP's and our FID's view)."""
    w, h = image.size
    scale = size / min(w, h)
    image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), resample)
    w, h = image.size
    left, top = (w - size) // 2, (h - size) // 2
    return image.crop((left, top, left + size, top + size))


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """(N, 3, H, W) float in [0, 1]."""
    return torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in images])).permute(
        0, 3, 1, 2
    )


def read_wave(path: str | Path) -> tuple[np.ndarray, int]:
    """Mono float32 waveform in [-1, 1] and its sample rate (soundfile, PyAV for compressed formats)."""
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
        return data.mean(axis=1), int(rate)
    except Exception:
        import av  # deferred: PyAV (FFmpeg) costs ~0.1 s to import; only what libsndfile can not read needs it

        with av.open(str(path)) as container:
            stream = container.streams.audio[0]
            rate = stream.codec_context.sample_rate
            resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
            chunks = [
                out.to_ndarray().reshape(-1)
                for frame in container.decode(stream)
                for out in resampler.resample(frame)
            ]
        return np.concatenate(chunks).astype(np.float32), int(rate)


def read_video_frames(path: str | Path, max_frames: int | None = None) -> list[Image.Image]:
    """The frames of a video as RGB images; at most ``max_frames``, evenly spaced."""
    import av  # deferred: PyAV (FFmpeg) costs ~0.1 s to import; only reading a video needs it

    with av.open(str(path)) as container:
        frames = [f.to_image() for f in container.decode(video=0)]
    if max_frames and len(frames) > max_frames:
        keep = np.linspace(0, len(frames) - 1, max_frames).round().astype(int)
        frames = [frames[i] for i in keep]
    return frames
