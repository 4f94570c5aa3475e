"""ImageBind's audio transform: 16 kHz sinc resampling, 3 clips of 2 s, Kaldi fbank; only the clips'
samples are read."""

from __future__ import annotations

import bisect
import math
from fractions import Fraction

import numpy as np
import torch
import torch.nn.functional as F

from nextgpt.encoders.preprocess.audio_readers import AvAudio, SoundfileAudio, with_reader
from nextgpt.encoders.preprocess.common import (
    MediaDecodeError,
    MediaSource,
    Source,
    clip_starts,
    existing_source,
)
from nextgpt.encoders.preprocess.kaldi import kaldi_fbank
from nextgpt.encoders.preprocess.resampling import resample, resample_source, resample_span, resampled_length


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted [lo, hi) spans with the overlapping ones joined (touching ones stay apart)."""
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(spans):
        if out and lo < out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def _clip_spans(n: int, sample_rate: int, clip_duration: float, num_clips: int) -> list[tuple[int, int]]:
    """[a, b) per clip in an n-sample waveform at sample_rate, exactly the slices the whole-file path took."""
    duration = n / sample_rate
    spans = []
    for start in clip_starts(duration, clip_duration, num_clips):
        end = start + Fraction(clip_duration)
        a = min(int(start * sample_rate), n)
        spans.append((a, max(a, min(int(end * sample_rate), n))))
    return spans


def _read_clip_audio(
    p: Source, reader: SoundfileAudio | AvAudio, sample_rate: int, num_clips: int, clip_duration: float
) -> tuple[list[tuple[torch.Tensor, int]], list[tuple[int, int, int]]]:
    """Mono waveform at sample_rate for just the clips: (groups, clips).

    groups are (1, m) tensors and the resampled sample index they start at, one per run of overlapping
    clips (so clips that share samples share storage, as views of one waveform did); clips are
    (group, a, b) in resampled samples. Only the input samples each group's resampling needs are read.
    A read that comes back short means the header overstated the length: plan again with the length seen.
    """
    n, sr = reader.n, reader.sr
    for _ in range(4):
        if n <= 0:
            raise MediaDecodeError(p.label, "audio has no samples")
        n16 = resampled_length(n, sr, sample_rate)
        spans = _clip_spans(n16, sample_rate, clip_duration, num_clips)
        groups = _merge(spans)
        sources = [resample_source(a, b, sr, sample_rate) if b > a else (0, 0, a) for a, b in groups]
        ranges = _merge([(max(lo, 0), min(hi, n)) for lo, hi, _ in sources if min(hi, n) > max(lo, 0)])
        segments = reader.read(ranges)
        short = [lo + len(x) for (lo, hi), x in zip(ranges, segments, strict=False) if len(x) < hi - lo]
        if not short:
            break
        n = min(short)
    for x in segments:
        if not np.isfinite(x).all():
            raise MediaDecodeError(p.label, "audio contains NaN/inf samples")
    out = []
    for (a, b), (lo, hi, first) in zip(groups, sources, strict=False):
        buf = np.zeros(hi - lo, np.float32)  # zeros outside the file, as resample()'s padding
        for (r_lo, r_hi), x in zip(ranges, segments, strict=False):
            s, e = max(lo, 0, r_lo), min(hi, n, r_hi)
            if e > s:
                piece = x[s - r_lo : e - r_lo]
                buf[s - lo : s - lo + len(piece)] = piece
        y = resample_span(torch.from_numpy(buf)[None], sr, sample_rate) if b > a else torch.zeros(1, 0)
        out.append((y[:, a - first : b - first], a))
    starts = [a for a, _ in groups]
    return out, [(bisect.bisect_right(starts, a) - 1, a, b) for a, b in spans]


def _decode_clip_audio(
    p: Source, sample_rate: int, num_clips: int, clip_duration: float
) -> tuple[list[tuple[torch.Tensor, int]], list[tuple[int, int, int]]]:
    return with_reader(p, lambda reader: _read_clip_audio(p, reader, sample_rate, num_clips, clip_duration))


def load_waveform(
    path: MediaSource, *, sample_rate: int, seconds: float, name: str | None = None
) -> torch.Tensor:
    """(samples,) the first ``seconds`` of mono audio at ``sample_rate`` (zero-padded when shorter), as a
    decoder's training target: only those samples (and the resampling filter's reach) are read."""
    p = existing_source(path, name)
    want = round(seconds * sample_rate)

    def read(reader: SoundfileAudio | AvAudio) -> torch.Tensor:
        need = min(reader.n, math.ceil(want * reader.sr / sample_rate) + reader.sr // 50 + 64)
        if need <= 0:
            raise MediaDecodeError(p.label, "audio has no samples")
        (x,) = reader.read([(0, need)])
        if not np.isfinite(x).all():
            raise MediaDecodeError(p.label, "audio contains NaN/inf samples")
        return resample(
            torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None], reader.sr, sample_rate
        )[0]

    y = with_reader(p, read)[:want]
    return F.pad(y, (0, want - len(y))) if len(y) < want else y


def load_audio(
    path: MediaSource,
    *,
    name: str | None = None,
    num_clips: int = 3,
    clip_duration: float = 2.0,
    sample_rate: int = 16000,
    num_mel_bins: int = 128,
    target_length: int = 204,
    mean: float = -4.268,
    std: float = 9.138,
) -> torch.Tensor:
    """(num_clips, 1, num_mel_bins, target_length) log-mel clips as ImageBind's ``load_and_transform_audio_data``.

    Deviation: channels are averaged to mono (the original feeds channel 0 of a stereo file to the fbank).
    Resampling uses :func:`resample` (torchaudio's sinc_interp_hann algorithm in torch). Like the
    original, each clip's mean is subtracted *in place* on a view of the waveform, so overlapping
    clips (audio shorter than ``(num_clips + 1) * clip_duration``) see their predecessors' DC removal.
    Memory is bounded by the clips, not the file: the length comes from the header and only the
    samples the clips (and their resampling filter) need are read and resampled, with the same values
    a whole-file read and resample gives. NaN/inf samples are an error where a clip reads them.
    """
    p = existing_source(path, name)
    groups, clip_spans = _decode_clip_audio(p, sample_rate, num_clips, clip_duration)
    clips = []
    for g, a, b in clip_spans:
        buf, start = groups[g]
        clip = buf[:, a - start : b - start]  # a view, as in the original
        clip -= clip.mean()
        fbank = kaldi_fbank(clip, sample_rate, num_mel_bins).transpose(0, 1)  # (mel, frames)
        pad = target_length - fbank.shape[1]
        fbank = F.pad(fbank, (0, pad)) if pad > 0 else fbank[:, :target_length]
        clips.append(((fbank - mean) / std).unsqueeze(0))
    return torch.stack(clips, dim=0)
