"""What every media loader shares: the error type, the input forms (path, bytes, file object), CLIP
normalisation and pytorchvideo's clip sampling."""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import BinaryIO, cast

import torch

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_SIZE = 224


class MediaDecodeError(ValueError):
    """A media file could not be decoded; ``path`` and ``reason`` say which and why."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot decode {self.path}: {reason}")


MediaSource = str | os.PathLike | bytes | bytearray | memoryview | BinaryIO


@dataclass(frozen=True)
class Source:
    """A path or in-memory bytes, and the label errors carry; decoders may open it several times."""

    label: str
    path: Path | None = None
    data: bytes | None = None

    def open(self) -> str | io.BytesIO:
        """What PIL / soundfile / PyAV accept: the path as a string, or a fresh rewound buffer."""
        if self.path is not None:
            return str(self.path)
        assert self.data is not None  # existing_source gives every Source a path or its bytes
        buf = io.BytesIO(self.data)
        buf.name = self.label  # soundfile guesses the format from a name's suffix
        return buf


def existing_source(source: MediaSource, name: str | None = None) -> Source:
    if isinstance(source, (bytes, bytearray, memoryview)):
        src = Source(name or "<bytes>", data=bytes(source))
    elif hasattr(source, "read"):
        stream = cast(BinaryIO, source)
        label = name or str(getattr(stream, "name", None) or "<stream>")
        try:
            if stream.seekable():
                stream.seek(0)
            data = stream.read()
        except Exception as e:  # a closed or broken stream
            raise MediaDecodeError(label, f"cannot read the stream ({type(e).__name__}: {e})") from e
        if not isinstance(data, (bytes, bytearray)):
            raise MediaDecodeError(
                label, f"stream returned {type(data).__name__}, not bytes (open it in binary mode)"
            )
        src = Source(label, data=bytes(data))
    else:
        p = Path(source)
        if not p.is_file():
            raise MediaDecodeError(name or p, "file does not exist")
        if p.stat().st_size == 0:
            raise MediaDecodeError(name or p, "file is empty (0 bytes)")
        return Source(str(name or p), path=p)
    if not src.data:
        raise MediaDecodeError(src.label, "data is empty (0 bytes)")
    return src


def normalize_channels(
    x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...], dim: int
) -> torch.Tensor:
    shape = [1] * x.ndim
    shape[dim] = -1
    m = torch.as_tensor(mean, dtype=x.dtype).view(shape)
    s = torch.as_tensor(std, dtype=x.dtype).view(shape)
    return (x - m) / s


def clip_starts(duration: float, clip_duration: float, num_clips: int) -> list[Fraction]:
    """pytorchvideo ConstantClipsPerVideoSampler: starts k * max(duration - clip, 0) / num_clips, k < num_clips."""
    max_start = Fraction(max(duration - Fraction(clip_duration), 0))
    step = Fraction(max_start, num_clips)
    return [step * k for k in range(num_clips)]


class NoSeek(Exception):
    """Seeking gave something a forward decode would not: decode forward instead."""
