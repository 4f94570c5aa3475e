"""ImageBind's video transform: 5 clips of 2 frames, short-side scale, CLIP mean/std, 3 spatial
crops; each wanted frame is decoded from the keyframe before it."""

from __future__ import annotations

import math
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import torch
import torch.nn.functional as F

from nextgpt.encoders.preprocess.common import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGE_SIZE,
    MediaDecodeError,
    MediaSource,
    NoSeek,
    Source,
    clip_starts,
    existing_source,
    normalize_channels,
)


# --------------------------------------------------------------------------------------------------
# video
# --------------------------------------------------------------------------------------------------
def _short_side_scale(x: torch.Tensor, size: int) -> torch.Tensor:
    """pytorchvideo ShortSideScale on (C, T, H, W): bilinear, align_corners=False, no antialias."""
    _, _, h, w = x.shape
    if w < h:
        new_h, new_w = int(math.floor(h / w * size)), size
    else:
        new_h, new_w = size, int(math.floor(w / h * size))
    return F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False)


def _uniform_crop(x: torch.Tensor, size: int, spatial_idx: int) -> torch.Tensor:
    """ImageBind's uniform_crop on (C, T, H, W): 0/1/2 = left/centre/right (top/centre/bottom if portrait)."""
    h, w = x.shape[-2:]
    y_off = int(math.ceil((h - size) / 2))
    x_off = int(math.ceil((w - size) / 2))
    if h > w:
        y_off = {0: 0, 1: y_off, 2: h - size}[spatial_idx]
    else:
        x_off = {0: 0, 1: x_off, 2: w - size}[spatial_idx]
    return x[..., y_off : y_off + size, x_off : x_off + size]


def _video_frame_indices(
    num_frames: int, fps: float, num_clips: int, clip_duration: float, frames_per_clip: int
) -> list[list[int]]:
    """Frame numbers per clip: decord-style ``[ceil(fps*start), min(ceil(fps*end), n))``, uniformly subsampled."""
    duration = num_frames / fps
    out = []
    for start in clip_starts(duration, clip_duration, num_clips):
        end = start + Fraction(clip_duration)
        first = min(math.ceil(fps * start), num_frames - 1)
        last = min(math.ceil(fps * end), num_frames)
        idxs = list(range(first, max(last, first + 1)))
        pick = (
            torch.linspace(0, len(idxs) - 1, frames_per_clip).clamp(0, len(idxs) - 1).long()
        )  # UniformTemporalSubsample
        out.append([idxs[i] for i in pick.tolist()])
    return out


@dataclass(frozen=True)
class _VideoIndex:
    """What demuxing says of a video stream: frame count and average fps, and for seeking the frames'
    presentation timestamps in order and the keyframes' (None where the stream is too irregular to seek)."""

    count: int
    fps: float
    pts: np.ndarray | None = None  # int64, ascending
    keyframes: np.ndarray | None = None  # int64, ascending


def _probe_video(p: Source) -> _VideoIndex:
    """Frame count and rate by demuxing packets (as decord indexes them), no decoding; the timestamps come along.

    Demuxing reads the whole file but holds one packet at a time. Timestamps are only kept for seeking when
    every counted packet has a distinct pts, none is flagged discard/corrupt and the first is a keyframe:
    then the i-th smallest pts is the i-th frame a decode from the start yields.
    """
    import av  # deferred: PyAV (FFmpeg) costs ~0.1 s to import and only decoding a video needs it

    pts, keys = array("q"), array("q")  # 8 bytes a frame: an hour at 25 fps is 0.7 MB
    regular = True
    try:
        with av.open(p.open(), mode="r") as container:
            if not container.streams.video:
                raise MediaDecodeError(p.label, "no video stream")
            stream = container.streams.video[0]
            count = 0
            for pkt in container.demux(stream):
                if pkt.size <= 0:
                    continue
                odd = (
                    pkt.pts is None
                    or pkt.is_discard
                    or pkt.is_corrupt
                    or (count == 0 and not pkt.is_keyframe)
                )
                regular = regular and not odd
                if regular and pkt.pts is not None:  # regular: every pts so far is known
                    pts.append(pkt.pts)
                    if pkt.is_keyframe:
                        keys.append(pkt.pts)
                count += 1
            rate = stream.average_rate or stream.guessed_rate
            if not rate and stream.duration and stream.time_base and count:
                rate = Fraction(count) / (stream.duration * stream.time_base)
    except MediaDecodeError:
        raise
    except Exception as e:
        raise MediaDecodeError(p.label, f"not a readable video ({type(e).__name__}: {e})") from e
    if count == 0:
        raise MediaDecodeError(p.label, "video stream has no frames")
    if not rate or float(rate) <= 0:
        raise MediaDecodeError(p.label, "video stream has no frame rate")
    order = np.sort(np.frombuffer(pts, dtype=np.int64))
    if not regular or not len(keys) or (np.diff(order) <= 0).any():
        return _VideoIndex(count, float(rate))
    return _VideoIndex(count, float(rate), order, np.sort(np.frombuffer(keys, dtype=np.int64)))


def _grab_sequential(p: Source, wanted: set[int]) -> tuple[dict[int, np.ndarray], int]:
    """Decode frames in presentation order, converting only ``wanted`` indices to RGB; returns (frames, decoded)."""
    import av  # deferred: PyAV (FFmpeg) costs ~0.1 s to import and only decoding a video needs it

    got: dict[int, np.ndarray] = {}
    last_i, last_frame = -1, None
    top = max(wanted)
    try:
        with av.open(p.open(), mode="r") as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for i, frame in enumerate(container.decode(stream)):
                if i in wanted:
                    got[i] = frame.to_ndarray(format="rgb24")
                last_i, last_frame = i, frame
                if i >= top:
                    break
    except Exception as e:
        if last_i < 0:
            raise MediaDecodeError(
                p.label, f"video frames cannot be decoded ({type(e).__name__}: {e})"
            ) from e
    if last_i < 0:
        raise MediaDecodeError(p.label, "video stream has no decodable frames")
    if last_i < top:  # fewer decodable frames than packets: reuse the last decoded frame
        assert last_frame is not None  # last_i >= 0: a frame was decoded
        fill = last_frame.to_ndarray(format="rgb24")
        for i in wanted:
            got.setdefault(i, got.get(last_i, fill))
    return got, last_i + 1


def _grab_seeking(p: Source, wanted: set[int], index: _VideoIndex) -> tuple[dict[int, np.ndarray], int]:
    """The frames :func:`_grab_sequential` gives, decoding each from the last keyframe at or before it.

    A frame is found by its pts. The decoder seeks only when that keyframe lies past the last decoded
    frame, so nearby frames (a short video) decode straight through. After a seek, frames before the
    keyframe landed on (open-GOP leading frames) are dropped. Raises :class:`NoSeek` on anything a
    forward decode would do differently (a seek landing late, a wanted frame never appearing).
    """
    import av  # deferred: PyAV (FFmpeg) costs ~0.1 s to import and only decoding a video needs it

    assert index.pts is not None and index.keyframes is not None
    by_pts = {int(index.pts[i]): i for i in wanted}
    got: dict[int, np.ndarray] = {}
    decoded = 0
    with av.open(p.open(), mode="r") as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        packets: Iterator | None = None
        last: int | None = None  # pts of the last decoded frame
        floor: int | None = None  # pts of the keyframe the last seek landed on
        for target in sorted(by_pts):
            if by_pts[target] in got:
                continue
            k = int(np.searchsorted(index.keyframes, target, side="right")) - 1
            key = int(index.keyframes[k]) if k >= 0 else None
            ahead = last if packets is not None else int(index.keyframes[0])
            if key is not None and ahead is not None and key > ahead:
                container.seek(key, stream=stream)
                packets, floor = container.demux(stream), None
            elif packets is None:
                packets = container.demux(stream)
            while by_pts[target] not in got:
                packet = next(packets, None)
                if packet is None:
                    raise NoSeek(f"frame pts {target} never decoded")
                if floor is None and packet.size > 0:
                    if packet.pts is None or (key is not None and packet.pts > key):
                        raise NoSeek(f"seek to pts {key} landed at {packet.pts}")
                    floor = packet.pts
                for frame in packet.decode():
                    decoded += 1
                    if frame.pts is None:
                        raise NoSeek("a frame without pts")
                    last = frame.pts
                    i = by_pts.get(frame.pts)
                    if i is not None and i not in got and floor is not None and frame.pts >= floor:
                        got[i] = frame.to_ndarray(format="rgb24")
                if last is not None and last > target and by_pts[target] not in got:
                    raise NoSeek(f"frame pts {target} skipped")
    return got, decoded


def _grab(p: Source, wanted: set[int], index: _VideoIndex | None = None) -> tuple[dict[int, np.ndarray], int]:
    """Wanted frames as RGB arrays and how many frames were decoded: by seeking where the index allows, else forward."""
    if index is not None and index.pts is not None:
        try:
            return _grab_seeking(p, wanted, index)
        except Exception:  # irregular or damaged stream: the forward decode defines the result
            pass
    return _grab_sequential(p, wanted)


def load_video(
    path: MediaSource,
    *,
    name: str | None = None,
    num_clips: int = 5,
    clip_duration: float = 2.0,
    frames_per_clip: int = 2,
    size: int = IMAGE_SIZE,
    num_crops: int = 3,
) -> torch.Tensor:
    """(num_clips*num_crops, 3, frames_per_clip, size, size) as ImageBind's ``load_and_transform_video_data``.

    Clip-major order (clip 0 crops 0..2, clip 1 ...). Duration is frames / average fps as decord reports
    it; videos shorter than a clip reuse their frames (all clips start at 0). Rotation metadata is
    ignored, as decord does. If decoding stops early (a damaged stream with fewer decodable frames than
    packets), the missing frames repeat the last decoded one; no decodable frame at all is an error.
    Only the wanted frames' GOPs are decoded (a seek to the keyframe before each), so a long video costs
    a demux pass plus a few GOPs, not a decode of everything up to the last clip; streams whose packet
    timestamps can not name frames, or where a seek misbehaves, are decoded from the start as before.
    (In a stream with corrupt packets, a frame decoded after a seek may be concealed differently.)
    """
    if num_crops not in (1, 3):
        raise ValueError(f"num_crops must be 1 or 3 (ImageBind's SpatialCrop), got {num_crops}")
    if num_clips < 1 or frames_per_clip < 1:
        raise ValueError("num_clips and frames_per_clip must be >= 1")
    p = existing_source(path, name)
    index = _probe_video(p)
    per_clip = _video_frame_indices(index.count, index.fps, num_clips, clip_duration, frames_per_clip)
    frames, _ = _grab(p, {i for idxs in per_clip for i in idxs}, index)
    crops = [1] if num_crops == 1 else [0, 1, 2]
    out: list[torch.Tensor] = []
    for idxs in per_clip:
        clip = torch.from_numpy(np.stack([frames[i] for i in idxs])).permute(3, 0, 1, 2).float()  # (C,T,H,W)
        clip = _short_side_scale(clip / 255.0, size)
        clip = normalize_channels(clip, CLIP_MEAN, CLIP_STD, dim=0)
        out.extend(_uniform_crop(clip, size, k) for k in crops)
    return torch.stack(out, dim=0).contiguous()
