"""ImageBind's audio transform: 16 kHz sinc resampling, 3 clips of 2 s, Kaldi fbank; only the clips'
samples are read."""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Callable, Iterable, Iterator
from fractions import Fraction
from functools import lru_cache
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from nextgpt.encoders.preprocess.common import (
    MediaDecodeError,
    MediaSource,
    NoSeek,
    Source,
    clip_starts,
    existing_source,
)

T = TypeVar("T")


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


def kaldi_fbank(
    waveform: torch.Tensor,
    sample_rate: int,
    num_mel_bins: int,
    frame_length_ms: float = 25.0,
    frame_shift_ms: float = 10.0,
) -> torch.Tensor:
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
        raise ValueError(
            f"frame length {frame_length_ms} ms / shift {frame_shift_ms} ms too short at {sample_rate} Hz"
        )
    padded = 1 if window_size == 0 else 2 ** (window_size - 1).bit_length()
    n = waveform.shape[0]
    if n < window_size:
        return waveform.new_zeros((0, num_mel_bins))
    num_frames = 1 + (n - window_size) // window_shift
    waveform = waveform.contiguous()
    frames = waveform.as_strided(
        (num_frames, window_size), (window_shift * waveform.stride(0), waveform.stride(0))
    )
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
def _sinc_kernel(
    orig: int, new: int, lowpass_filter_width: int = 6, rolloff: float = 0.99
) -> tuple[torch.Tensor, int]:
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


def _resampled_length(n: int, orig_freq: int, new_freq: int) -> int:
    """Samples :func:`resample` returns for n: ceil(n * new / orig), rates reduced by gcd, float32 as torchaudio."""
    if orig_freq == new_freq:
        return n
    g = math.gcd(int(orig_freq), int(new_freq))
    orig, new = int(orig_freq) // g, int(new_freq) // g
    return int(torch.ceil(torch.as_tensor(new * n / orig)))  # float32 rounding, as torchaudio


def _sinc_blocks(x: torch.Tensor, orig: int, new: int) -> torch.Tensor:
    """The polyphase filter over already padded (batch, m) float32 input: (batch, blocks * new) output samples."""
    kernel, _ = _sinc_kernel(orig, new)
    y = F.conv1d(x[:, None], kernel, stride=orig)  # (batch, new, blocks)
    return y.transpose(1, 2).reshape(x.shape[0], -1)


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
    _, width = _sinc_kernel(orig, new)
    shape = waveform.shape
    x = waveform.reshape(-1, shape[-1]).to(torch.float32)
    y = _sinc_blocks(F.pad(x, (width, width + orig)), orig, new)
    return y[..., : _resampled_length(shape[-1], orig_freq, new_freq)].reshape(*shape[:-1], -1)


def _resample_source(a: int, b: int, orig_freq: int, new_freq: int) -> tuple[int, int, int]:
    """Input samples [lo, hi) that :func:`resample`'s outputs [a, b) depend on, and the output index of lo's block.

    resample() pads ``width`` zeros in front and makes output block j (samples j*new .. j*new + new - 1)
    from padded inputs j*orig .. j*orig + 2*width + orig - 1, so resampling just that span, zero-filled
    outside the file, gives the whole-file values: no edge effects, only float summation order may differ.
    """
    if orig_freq == new_freq:
        return a, b, a
    g = math.gcd(int(orig_freq), int(new_freq))
    orig, new = int(orig_freq) // g, int(new_freq) // g
    _, width = _sinc_kernel(orig, new)
    first, last = a // new, (b - 1) // new
    return first * orig - width, (last + 1) * orig + width, first * new


def _resample_span(x: torch.Tensor, orig_freq: int, new_freq: int) -> torch.Tensor:
    """resample() outputs from (1, m) input laid out as :func:`_resample_source` says (no padding added here)."""
    if orig_freq == new_freq:
        return x
    g = math.gcd(int(orig_freq), int(new_freq))
    return _sinc_blocks(x.to(torch.float32), int(orig_freq) // g, int(new_freq) // g)


_UNKNOWN_LENGTH = 2**62  # libsndfile reports SF_COUNT_MAX frames for streams of unknown length
_BLOCK = 1 << 16  # samples per read when a file has to be read forward


def _mono(x: np.ndarray) -> np.ndarray:
    """(n, channels) -> (n,) float32 channel mean, the same reduction the whole-file path did."""
    return np.ascontiguousarray(x.astype(np.float32, copy=False).mean(axis=1, dtype=np.float32))


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted [lo, hi) spans with the overlapping ones joined (touching ones stay apart)."""
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(spans):
        if out and lo < out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def _collect(chunks: Iterable[tuple[int, np.ndarray]], ranges: list[tuple[int, int]]) -> list[np.ndarray]:
    """Keep what falls in each of the sorted, disjoint ``ranges`` of a stream of (position, samples) chunks.

    Stops reading once the last range is complete; a range the stream ends inside comes back short.
    """
    pieces: list[list[np.ndarray]] = [[] for _ in ranges]
    done = 0
    for pos, x in chunks:
        end = pos + len(x)
        for j in range(done, len(ranges)):
            lo, hi = ranges[j]
            if lo >= end:
                break
            s, e = max(lo, pos), min(hi, end)
            if e > s:
                pieces[j].append(x[s - pos : e - pos].copy())
        while done < len(ranges) and ranges[done][1] <= end:
            done += 1
        if done == len(ranges):
            break
    return [np.concatenate(p) if p else np.zeros(0, np.float32) for p in pieces]


def _counted(chunks: Iterable[np.ndarray]) -> Iterator[tuple[int, np.ndarray]]:
    """Consecutive chunks with their start positions, counting from 0 (a forward read)."""
    pos = 0
    for x in chunks:
        yield pos, x
        pos += len(x)


class _SoundfileAudio:
    """Sample spans through libsndfile: the length from the header, each span read after a seek.

    A file libsndfile can not seek, whose length it does not know, or in Ogg (libsndfile's Vorbis seeks
    are not sample exact, libsndfile issue #885: spans came back shifted by up to a block) is read
    forward block by block instead, keeping only the spans: whole-file decode time, span-sized memory.
    """

    def __init__(self, p: Source) -> None:
        import soundfile as sf

        self.p = p
        self.f = sf.SoundFile(p.open())
        self.sr = int(self.f.samplerate)
        self.seekable = bool(self.f.seekable()) and self.f.format != "OGG"
        frames = int(self.f.frames)  # a header that overstates it is caught by the short read that follows
        self.n = frames if 0 <= frames < _UNKNOWN_LENGTH else sum(len(x) for x in self._blocks())

    def _blocks(self) -> Iterator[np.ndarray]:
        """Mono blocks from the start of a fresh handle (the open one may not rewind)."""
        import soundfile as sf

        with sf.SoundFile(self.p.open()) as f:
            while len(block := f.read(_BLOCK, dtype="float32", always_2d=True)):
                yield _mono(block)

    def read(self, ranges: list[tuple[int, int]]) -> list[np.ndarray]:
        if not self.seekable:
            return _collect(_counted(self._blocks()), ranges)
        out = []
        for lo, hi in ranges:
            self.f.seek(lo)
            out.append(_mono(self.f.read(hi - lo, dtype="float32", always_2d=True)))  # PCM scaled to [-1, 1)
        return out

    def close(self) -> None:
        self.f.close()


_SAMPLE_INDEXED = {"mov", "mp4", "m4a"}  # demuxers whose index gives exact timestamps after a seek


class _AvAudio:
    """Sample spans through PyAV for formats libsndfile lacks, positions counted as a whole-file decode counts them.

    Position 0 is the first decoded sample. In MP4/M4A/MOV with a time base that resolves single samples,
    each span is decoded after a seek to half a second before it (so the codec's overlap state is
    rebuilt) and the length is read off the last frames. Elsewhere (Matroska's millisecond stamps would
    misplace spans by up to half a millisecond; raw ADTS/MP3 streams only estimate timestamps after a
    seek), or when a seek misbehaves, the stream is decoded forward from the start, once to count and
    once to keep the spans: whole-file decode time, span-sized memory.
    """

    PREROLL = Fraction(1, 2)  # seconds decoded and dropped before a span after a seek

    def __init__(self, p: Source) -> None:
        import av

        self.p = p
        self.container = av.open(p.open())
        try:
            if not self.container.streams.audio:
                raise MediaDecodeError(p.label, "no audio stream")
            s = self.container.streams.audio[0]
            self.stream = s
            self.sr = int(s.codec_context.sample_rate or s.rate)
            first = next(self.container.decode(s), None)
            if first is None:
                raise MediaDecodeError(p.label, "audio stream has no decodable samples")
            self.origin = None if first.pts is None else first.pts * first.time_base
            self.seeks = (
                self.origin is not None
                and s.time_base is not None
                and (1 / (s.time_base * self.sr)).denominator == 1
                and bool(_SAMPLE_INDEXED & set(self.container.format.name.split(",")))
            )
            self.n = self._tail_length() if self.seeks else None
            if self.n is None:
                self.seeks = False
                self.n = sum(len(x) for x in self._forward())
        except BaseException:
            self.container.close()
            raise

    def _forward(self) -> Iterator[np.ndarray]:
        """Mono samples from the start of a fresh container, in order (positions by count, as the whole-file path)."""
        import av

        with av.open(self.p.open()) as container:
            stream = container.streams.audio[0]
            resampler = av.AudioResampler(format="fltp", layout=None, rate=self.sr)
            frames = (out for frame in container.decode(stream) for out in resampler.resample(frame))
            for out in itertools.chain(frames, resampler.resample(None)):
                yield _mono(out.to_ndarray().T)

    def _from(self, at: Fraction) -> Iterator[tuple[int, np.ndarray]]:
        """(position, mono samples) after a seek to ``at`` seconds, positions from the first frame's pts."""
        import av

        s = self.stream
        self.container.seek(int(math.floor(at / s.time_base)), stream=s)
        resampler = av.AudioResampler(format="fltp", layout=None, rate=self.sr)
        pos = None
        for frame in self.container.decode(s):
            if pos is None:
                if frame.pts is None:
                    raise NoSeek("a frame without pts")
                pos = round((frame.pts * frame.time_base - self.origin) * self.sr)
            for out in resampler.resample(frame):
                x = _mono(out.to_ndarray().T)
                yield pos, x
                pos += len(x)

    def _tail_length(self) -> int | None:
        """Samples a whole decode yields: decode the last seconds (the header's duration is only an estimate)."""
        import av

        s = self.stream
        if s.duration:
            duration = s.duration * s.time_base
        elif self.container.duration:
            duration = Fraction(self.container.duration, av.time_base)
        else:
            return None
        try:
            end = None
            for pos, x in self._from(self.origin + max(duration - 5, 0)):
                end = pos + len(x)
            return end
        except Exception:  # a demuxer that can not seek: count forward instead
            return None

    def _seek_read(self, lo: int, hi: int) -> np.ndarray:
        preroll = self.PREROLL
        for _ in range(3):
            at = self.origin + max(Fraction(lo, self.sr) - preroll, 0)
            run = self._from(at)
            first = next(run, None)
            if (
                first is not None and first[0] <= lo - preroll * self.sr / 2
            ):  # at least half the pre-roll decoded
                return _collect(itertools.chain([first], run), [(lo, hi)])[0]
            if at == self.origin:
                break
            preroll *= 4  # landed after the span: seek further back
        raise NoSeek(f"a seek before sample {lo} landed after it")

    def read(self, ranges: list[tuple[int, int]]) -> list[np.ndarray]:
        """Spans within the pre-roll of the start come from a forward decode (what a seek there would do, exactly)."""
        near = (
            sum(1 for lo, _ in ranges if Fraction(lo, self.sr) <= self.PREROLL) if self.seeks else len(ranges)
        )
        out = _collect(_counted(self._forward()), ranges[:near]) if near else []
        if near < len(ranges):
            try:
                out += [self._seek_read(lo, hi) for lo, hi in ranges[near:]]
            except Exception:  # any seek trouble: the forward decode is the reference behaviour
                self.seeks = False
                return _collect(_counted(self._forward()), ranges)
        return out

    def close(self) -> None:
        self.container.close()


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
    p: Source, reader: _SoundfileAudio | _AvAudio, sample_rate: int, num_clips: int, clip_duration: float
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
        n16 = _resampled_length(n, sr, sample_rate)
        spans = _clip_spans(n16, sample_rate, clip_duration, num_clips)
        groups = _merge(spans)
        sources = [_resample_source(a, b, sr, sample_rate) if b > a else (0, 0, a) for a, b in groups]
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
        y = _resample_span(torch.from_numpy(buf)[None], sr, sample_rate) if b > a else torch.zeros(1, 0)
        out.append((y[:, a - first : b - first], a))
    starts = [a for a, _ in groups]
    return out, [(bisect.bisect_right(starts, a) - 1, a, b) for a, b in spans]


def _with_reader(p: Source, read: Callable[[_SoundfileAudio | _AvAudio], T]) -> T:
    """``read(reader)`` through soundfile, else (it can not open or read the file) through PyAV."""
    try:
        reader: _SoundfileAudio | _AvAudio = _SoundfileAudio(p)
    except Exception as e:
        sf_error: Exception | None = e
    else:
        try:
            return read(reader)
        except MediaDecodeError:
            raise
        except Exception as e:  # libsndfile opened it but can not decode it: PyAV may
            sf_error = e
        finally:
            reader.close()
    try:
        reader = _AvAudio(p)
    except MediaDecodeError:
        raise
    except Exception as e:
        raise MediaDecodeError(
            p.label, f"not a readable audio file (soundfile: {sf_error}; PyAV: {e})"
        ) from e
    try:
        return read(reader)
    except MediaDecodeError:
        raise
    except Exception as e:  # a stream failing after its first frames
        raise MediaDecodeError(p.label, f"audio cannot be decoded ({type(e).__name__}: {e})") from e
    finally:
        reader.close()


def _decode_clip_audio(
    p: Source, sample_rate: int, num_clips: int, clip_duration: float
) -> tuple[list[tuple[torch.Tensor, int]], list[tuple[int, int, int]]]:
    return _with_reader(p, lambda reader: _read_clip_audio(p, reader, sample_rate, num_clips, clip_duration))


def load_waveform(
    path: MediaSource, *, sample_rate: int, seconds: float, name: str | None = None
) -> torch.Tensor:
    """(samples,) the first ``seconds`` of mono audio at ``sample_rate`` (zero-padded when shorter), as a
    decoder's training target: only those samples (and the resampling filter's reach) are read."""
    p = existing_source(path, name)
    want = round(seconds * sample_rate)

    def read(reader: _SoundfileAudio | _AvAudio) -> torch.Tensor:
        need = min(reader.n, math.ceil(want * reader.sr / sample_rate) + reader.sr // 50 + 64)
        if need <= 0:
            raise MediaDecodeError(p.label, "audio has no samples")
        (x,) = reader.read([(0, need)])
        if not np.isfinite(x).all():
            raise MediaDecodeError(p.label, "audio contains NaN/inf samples")
        return resample(
            torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None], reader.sr, sample_rate
        )[0]

    y = _with_reader(p, read)[:want]
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
