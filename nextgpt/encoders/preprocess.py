"""ImageBind-faithful media preprocessing without torchvision / torchaudio / pytorchvideo.

The NExT-GPT encoder side only sees what ImageBind's ``data.py`` produces, so this module re-creates
those tensors with Pillow, PyAV, soundfile, numpy and torch:

* image: ``Resize(224, bicubic)`` on the PIL image (torchvision size rule: short side 224, long side
  ``int(224 * long / short)``), ``CenterCrop(224)`` (offsets ``int(round((s - 224) / 2))``), /255 and
  CLIP mean/std.
* audio: float waveform, resampled to 16 kHz with torchaudio's ``sinc_interp_hann`` algorithm
  (re-implemented here in torch), pytorchvideo ``ConstantClipsPerVideoSampler`` clips, per-clip DC
  removal, Kaldi fbank (:func:`kaldi_fbank`), zero-pad/crop to ``target_length`` frames, normalise.
* video: frames decoded with PyAV, decord-style frame indexing of each sampled clip, pytorchvideo
  ``UniformTemporalSubsample`` + ``ShortSideScale`` (bilinear), CLIP mean/std and ImageBind's
  3-way ``SpatialCrop``.

Every loader takes a path, raw ``bytes`` or a binary file object (a WebDataset shard member is
decoded from memory, never unpacked to disk). Every unreadable input raises :class:`MediaDecodeError`
naming the file (or, for in-memory data, the ``name=`` given, else the file object's ``.name``, e.g.
``"cc3m-000003.tar:001312382.jpg"``), so data pipelines can skip or report broken samples with one
``except``.
"""
from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "MediaDecodeError",
    "MediaSource",
    "kaldi_fbank",
    "load_audio",
    "load_image",
    "load_media",
    "load_video",
    "resample",
]

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
class _Source:
    """A path or in-memory bytes, and the label errors carry; decoders may open it several times."""

    label: str
    path: Path | None = None
    data: bytes | None = None

    def open(self) -> str | io.BytesIO:
        """What PIL / soundfile / PyAV accept: the path as a string, or a fresh rewound buffer."""
        if self.path is not None:
            return str(self.path)
        buf = io.BytesIO(self.data)
        buf.name = self.label  # soundfile guesses the format from a name's suffix
        return buf


def _existing(source: MediaSource, name: str | None = None) -> _Source:
    if isinstance(source, (bytes, bytearray, memoryview)):
        src = _Source(name or "<bytes>", data=bytes(source))
    elif hasattr(source, "read"):
        label = name or str(getattr(source, "name", None) or "<stream>")
        try:
            if source.seekable():
                source.seek(0)
            data = source.read()
        except Exception as e:  # a closed or broken stream
            raise MediaDecodeError(label, f"cannot read the stream ({type(e).__name__}: {e})") from e
        if not isinstance(data, (bytes, bytearray)):
            raise MediaDecodeError(label, f"stream returned {type(data).__name__}, not bytes (open it in binary mode)")
        src = _Source(label, data=bytes(data))
    else:
        p = Path(source)
        if not p.is_file():
            raise MediaDecodeError(name or p, "file does not exist")
        if p.stat().st_size == 0:
            raise MediaDecodeError(name or p, "file is empty (0 bytes)")
        return _Source(str(name or p), path=p)
    if not src.data:
        raise MediaDecodeError(src.label, "data is empty (0 bytes)")
    return src


def _normalize_channels(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...], dim: int) -> torch.Tensor:
    shape = [1] * x.ndim
    shape[dim] = -1
    m = torch.as_tensor(mean, dtype=x.dtype).view(shape)
    s = torch.as_tensor(std, dtype=x.dtype).view(shape)
    return (x - m) / s


# --------------------------------------------------------------------------------------------------
# image
# --------------------------------------------------------------------------------------------------
def load_image(path: MediaSource, *, name: str | None = None) -> torch.Tensor:
    """(3, 224, 224) float32 as ImageBind's vision transform: RGB, bicubic short side 224, centre crop, CLIP norm."""
    from PIL import Image

    p = _existing(path, name)
    try:
        with Image.open(p.open()) as im:
            im = im.convert("RGB")  # forces the full decode: truncated files fail here
            w, h = im.size
            if w < 1 or h < 1:
                raise ValueError(f"image has size {w}x{h}")
            # torchvision Resize(int) size rule, then PIL bicubic resample (what torchvision uses on PIL)
            short, long = (w, h) if w <= h else (h, w)
            new_short, new_long = IMAGE_SIZE, int(IMAGE_SIZE * long / short)
            new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
            if (new_w, new_h) != (w, h):
                im = im.resize((new_w, new_h), Image.Resampling.BICUBIC)
            top = int(round((new_h - IMAGE_SIZE) / 2.0))
            left = int(round((new_w - IMAGE_SIZE) / 2.0))
            im = im.crop((left, top, left + IMAGE_SIZE, top + IMAGE_SIZE))
            arr = np.asarray(im, dtype=np.uint8).copy()
    except MediaDecodeError:
        raise
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, UnidentifiedImageError, ...
        raise MediaDecodeError(p.label, f"not a readable image ({type(e).__name__}: {e})") from e
    x = torch.from_numpy(arr).permute(2, 0, 1).float().div_(255.0)
    return _normalize_channels(x, CLIP_MEAN, CLIP_STD, dim=0)


# --------------------------------------------------------------------------------------------------
# audio
# --------------------------------------------------------------------------------------------------
def _mel_scale(freq: torch.Tensor | float) -> torch.Tensor | float:
    if isinstance(freq, torch.Tensor):
        return 1127.0 * (1.0 + freq / 700.0).log()
    return 1127.0 * math.log(1.0 + freq / 700.0)


def _mel_banks(num_bins: int, padded_window: int, sample_rate: float, low_freq: float = 20.0) -> torch.Tensor:
    """Kaldi's triangular HTK-mel filterbank, (num_bins, padded_window // 2 + 1) (last column zero)."""
    num_fft_bins = padded_window // 2
    nyquist = 0.5 * sample_rate
    high_freq = nyquist  # Kaldi high_freq=0 means "Nyquist"
    if not 0.0 <= low_freq < high_freq:
        raise ValueError(f"bad mel range [{low_freq}, {high_freq}] for sample rate {sample_rate}")
    fft_bin_width = sample_rate / padded_window
    mel_low, mel_high = _mel_scale(low_freq), _mel_scale(high_freq)
    delta = (mel_high - mel_low) / (num_bins + 1)
    b = torch.arange(num_bins).unsqueeze(1)
    left = mel_low + b * delta
    center = mel_low + (b + 1.0) * delta
    right = mel_low + (b + 2.0) * delta
    mel = _mel_scale(fft_bin_width * torch.arange(num_fft_bins)).unsqueeze(0)
    up = (mel - left) / (center - left)
    down = (right - mel) / (right - center)
    banks = torch.max(torch.zeros(1), torch.min(up, down))
    return F.pad(banks, (0, 1), value=0.0)


def kaldi_fbank(waveform: torch.Tensor, sample_rate: int, num_mel_bins: int, frame_length_ms: float = 25.0,
                frame_shift_ms: float = 10.0) -> torch.Tensor:
    """Log-mel filterbank, (frames, num_mel_bins): ``torchaudio.compliance.kaldi.fbank`` with ImageBind's options.

    Those are htk_compat=True, use_energy=False, window_type="hanning" (symmetric Hann), dither=0,
    and the Kaldi defaults: snip_edges (frames = 1 + (n - win) // shift), per-frame DC removal,
    pre-emphasis 0.97, FFT size rounded up to a power of two, power spectrum, mel bins from 20 Hz to
    Nyquist, log floored at float32 eps. ``waveform`` is (n,) or (channels, n); like torchaudio only
    channel 0 is used. Shorter than one window gives (0, num_mel_bins) instead of torchaudio's assert.
    """
    if waveform.ndim == 2:
        waveform = waveform[0]
    elif waveform.ndim != 1:
        raise ValueError(f"waveform must be (n,) or (channels, n), got {tuple(waveform.shape)}")
    if not waveform.is_floating_point():
        waveform = waveform.float()
    window_shift = int(sample_rate * frame_shift_ms * 0.001)
    window_size = int(sample_rate * frame_length_ms * 0.001)
    if window_size < 2 or window_shift < 1:
        raise ValueError(f"frame length {frame_length_ms} ms / shift {frame_shift_ms} ms too short at {sample_rate} Hz")
    padded = 1 if window_size == 0 else 2 ** (window_size - 1).bit_length()
    n = waveform.shape[0]
    if n < window_size:
        return waveform.new_zeros((0, num_mel_bins))
    num_frames = 1 + (n - window_size) // window_shift
    waveform = waveform.contiguous()
    frames = waveform.as_strided((num_frames, window_size), (window_shift * waveform.stride(0), waveform.stride(0)))
    frames = frames - frames.mean(dim=1, keepdim=True)  # remove_dc_offset
    previous = F.pad(frames.unsqueeze(0), (1, 0), mode="replicate").squeeze(0)  # x[-1] := x[0]
    frames = frames - 0.97 * previous[:, :-1]  # pre-emphasis
    frames = frames * torch.hann_window(window_size, periodic=False, dtype=frames.dtype)
    frames = F.pad(frames, (0, padded - window_size))
    power = torch.fft.rfft(frames).abs().pow(2.0)
    banks = _mel_banks(num_mel_bins, padded, float(sample_rate)).to(dtype=power.dtype)
    mel = torch.mm(power, banks.T)
    return torch.max(mel, torch.tensor(torch.finfo(torch.float).eps, dtype=mel.dtype)).log()


@lru_cache(maxsize=16)
def _sinc_kernel(orig: int, new: int, lowpass_filter_width: int = 6, rolloff: float = 0.99) -> tuple[torch.Tensor, int]:
    """Polyphase windowed-sinc (Hann) kernels, torchaudio's ``sinc_interp_hann`` defaults; rates reduced by gcd.

    Computed in float32 with the same operation order as torchaudio, so results match it bit for bit.
    """
    base = min(orig, new) * rolloff
    width = math.ceil(lowpass_filter_width * orig / base)
    idx = torch.arange(-width, width + orig, dtype=torch.float32)[None, None] / orig
    t = torch.arange(0, -new, -1, dtype=torch.float32)[:, None, None] / new + idx
    t = (t * base).clamp_(-lowpass_filter_width, lowpass_filter_width)
    window = torch.cos(t * math.pi / lowpass_filter_width / 2) ** 2
    t = t * math.pi
    kernels = torch.where(t == 0, torch.tensor(1.0), t.sin() / t)
    kernels *= window * (base / orig)
    return kernels, width


def resample(waveform: torch.Tensor, orig_freq: int, new_freq: int) -> torch.Tensor:
    """Band-limited resampling of (..., n), torchaudio.functional.resample's algorithm in plain torch.

    Windowed-sinc (Hann, 6 zero crossings, rolloff 0.99) polyphase filter applied with a strided conv1d;
    output length ceil(n * new / orig). float32 throughout, as torchaudio for float32 input.
    """
    if orig_freq <= 0 or new_freq <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_freq} -> {new_freq}")
    if orig_freq == new_freq:
        return waveform
    g = math.gcd(int(orig_freq), int(new_freq))
    orig, new = int(orig_freq) // g, int(new_freq) // g
    kernel, width = _sinc_kernel(orig, new)
    shape = waveform.shape
    x = waveform.reshape(-1, shape[-1]).to(torch.float32)
    n = x.shape[-1]
    x = F.pad(x, (width, width + orig))
    y = F.conv1d(x[:, None], kernel, stride=orig)  # (batch, new, blocks)
    y = y.transpose(1, 2).reshape(x.shape[0], -1)
    target = int(torch.ceil(torch.as_tensor(new * n / orig)))  # float32 rounding, as torchaudio
    return y[..., :target].reshape(*shape[:-1], -1)


def _clip_starts(duration: float, clip_duration: float, num_clips: int) -> list[Fraction]:
    """pytorchvideo ConstantClipsPerVideoSampler: starts k * max(duration - clip, 0) / num_clips, k < num_clips."""
    max_start = Fraction(max(duration - Fraction(clip_duration), 0))
    step = Fraction(max_start, num_clips)
    return [step * k for k in range(num_clips)]


def _read_waveform(p: _Source) -> tuple[torch.Tensor, int]:
    """(1, n) float32 mono waveform and its sample rate; soundfile first, PyAV for compressed formats."""
    import soundfile as sf

    try:
        data, sr = sf.read(p.open(), dtype="float32", always_2d=True)  # (n, channels), PCM scaled to [-1, 1)
    except Exception as sf_error:
        try:
            data, sr = _read_waveform_av(p)
        except MediaDecodeError:
            raise
        except Exception as e:
            raise MediaDecodeError(p.label, f"not a readable audio file (soundfile: {sf_error}; PyAV: {e})") from e
    if data.shape[0] == 0 or data.shape[1] == 0:
        raise MediaDecodeError(p.label, "audio has no samples")
    if not np.isfinite(data).all():
        raise MediaDecodeError(p.label, "audio contains NaN/inf samples")
    mono = torch.from_numpy(np.ascontiguousarray(data.mean(axis=1, dtype=np.float32)))
    return mono.unsqueeze(0), int(sr)


def _read_waveform_av(p: _Source) -> tuple[np.ndarray, int]:
    import av

    with av.open(p.open()) as container:
        if not container.streams.audio:
            raise MediaDecodeError(p.label, "no audio stream")
        stream = container.streams.audio[0]
        sr = stream.codec_context.sample_rate or stream.rate
        resampler = av.AudioResampler(format="fltp", layout=None, rate=sr)
        chunks = []
        for frame in container.decode(stream):
            for out in resampler.resample(frame):
                chunks.append(out.to_ndarray())  # (channels, n)
        for out in resampler.resample(None):
            chunks.append(out.to_ndarray())
    if not chunks:
        raise MediaDecodeError(p.label, "audio stream has no decodable samples")
    return np.concatenate(chunks, axis=1).T.astype(np.float32), int(sr)


def load_audio(path: MediaSource, *, name: str | None = None, num_clips: int = 3, clip_duration: float = 2.0, sample_rate: int = 16000,
               num_mel_bins: int = 128, target_length: int = 204, mean: float = -4.268,
               std: float = 9.138) -> torch.Tensor:
    """(num_clips, 1, num_mel_bins, target_length) log-mel clips as ImageBind's ``load_and_transform_audio_data``.

    Deviation: channels are averaged to mono (the original feeds channel 0 of a stereo file to the fbank).
    Resampling uses :func:`resample` (torchaudio's sinc_interp_hann algorithm in torch). Like the
    original, each clip's mean is subtracted *in place* on a view of the whole waveform, so overlapping
    clips (audio shorter than ``num_clips * clip_duration``) see their predecessors' DC removal.
    """
    p = _existing(path, name)
    waveform, sr = _read_waveform(p)
    if sr != sample_rate:
        waveform = resample(waveform, sr, sample_rate)
    duration = waveform.shape[1] / sample_rate
    clips = []
    for start in _clip_starts(duration, clip_duration, num_clips):
        end = start + Fraction(clip_duration)
        clip = waveform[:, int(start * sample_rate): int(end * sample_rate)]  # a view, as in the original
        clip -= clip.mean()
        fbank = kaldi_fbank(clip, sample_rate, num_mel_bins).transpose(0, 1)  # (mel, frames)
        pad = target_length - fbank.shape[1]
        fbank = F.pad(fbank, (0, pad)) if pad > 0 else fbank[:, :target_length]
        clips.append(((fbank - mean) / std).unsqueeze(0))
    return torch.stack(clips, dim=0)


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
    return x[..., y_off: y_off + size, x_off: x_off + size]


def _video_frame_indices(num_frames: int, fps: float, num_clips: int, clip_duration: float,
                         frames_per_clip: int) -> list[list[int]]:
    """Frame numbers per clip: decord-style ``[ceil(fps*start), min(ceil(fps*end), n))``, uniformly subsampled."""
    duration = num_frames / fps
    out = []
    for start in _clip_starts(duration, clip_duration, num_clips):
        end = start + Fraction(clip_duration)
        first = min(math.ceil(fps * start), num_frames - 1)
        last = min(math.ceil(fps * end), num_frames)
        idxs = list(range(first, max(last, first + 1)))
        pick = torch.linspace(0, len(idxs) - 1, frames_per_clip).clamp(0, len(idxs) - 1).long()  # UniformTemporalSubsample
        out.append([idxs[i] for i in pick.tolist()])
    return out


def _probe_video(p: _Source) -> tuple[int, float]:
    """(frame count, average fps): frames counted by demuxing packets (as decord indexes them), no decoding."""
    import av

    try:
        with av.open(p.open()) as container:
            if not container.streams.video:
                raise MediaDecodeError(p.label, "no video stream")
            stream = container.streams.video[0]
            count = sum(1 for pkt in container.demux(stream) if pkt.size > 0)
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
    return count, float(rate)


def _grab(p: _Source, wanted: set[int]) -> tuple[dict[int, np.ndarray], int]:
    """Decode frames in presentation order, converting only ``wanted`` indices to RGB; returns (frames, decoded)."""
    import av

    got: dict[int, np.ndarray] = {}
    last_i, last_frame = -1, None
    top = max(wanted)
    try:
        with av.open(p.open()) as container:
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
            raise MediaDecodeError(p.label, f"video frames cannot be decoded ({type(e).__name__}: {e})") from e
    if last_i < 0:
        raise MediaDecodeError(p.label, "video stream has no decodable frames")
    if last_i < top:  # fewer decodable frames than packets: reuse the last decoded frame
        fill = last_frame.to_ndarray(format="rgb24")
        for i in wanted:
            got.setdefault(i, got.get(last_i, fill))
    return got, last_i + 1


def load_video(path: MediaSource, *, name: str | None = None, num_clips: int = 5, clip_duration: float = 2.0, frames_per_clip: int = 2,
               size: int = IMAGE_SIZE, num_crops: int = 3) -> torch.Tensor:
    """(num_clips*num_crops, 3, frames_per_clip, size, size) as ImageBind's ``load_and_transform_video_data``.

    Clip-major order (clip 0 crops 0..2, clip 1 ...). Duration is frames / average fps as decord reports
    it; videos shorter than a clip reuse their frames (all clips start at 0). Rotation metadata is
    ignored, as decord does. If decoding stops early (a damaged stream with fewer decodable frames than
    packets), the missing frames repeat the last decoded one; no decodable frame at all is an error.
    """
    if num_crops not in (1, 3):
        raise ValueError(f"num_crops must be 1 or 3 (ImageBind's SpatialCrop), got {num_crops}")
    if num_clips < 1 or frames_per_clip < 1:
        raise ValueError("num_clips and frames_per_clip must be >= 1")
    p = _existing(path, name)
    count, fps = _probe_video(p)
    per_clip = _video_frame_indices(count, fps, num_clips, clip_duration, frames_per_clip)
    frames, _ = _grab(p, {i for idxs in per_clip for i in idxs})
    crops = [1] if num_crops == 1 else [0, 1, 2]
    out = []
    for idxs in per_clip:
        clip = torch.from_numpy(np.stack([frames[i] for i in idxs])).permute(3, 0, 1, 2).float()  # (C,T,H,W)
        clip = _short_side_scale(clip / 255.0, size)
        clip = _normalize_channels(clip, CLIP_MEAN, CLIP_STD, dim=0)
        out.extend(_uniform_crop(clip, size, k) for k in crops)
    return torch.stack(out, dim=0).contiguous()


# --------------------------------------------------------------------------------------------------
def load_media(modality: str, path: MediaSource, *, name: str | None = None) -> torch.Tensor:
    """Dispatch on the dataset modality name: "image" | "audio" | "video" with ImageBind's defaults."""
    loaders = {"image": load_image, "audio": load_audio, "video": load_video}
    if modality not in loaders:
        raise ValueError(f"unknown media modality {modality!r}; expected one of {sorted(loaders)}")
    return loaders[modality](path, name=name)
