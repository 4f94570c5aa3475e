"""Sample spans of an audio file, through libsndfile where it can, else through PyAV: only the spans
asked for are kept (and, where the format allows exact seeks, only they are decoded)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Iterator
from fractions import Fraction
from typing import TypeVar

import numpy as np
import soundfile as sf

from nextgpt.encoders.preprocess.common import MediaDecodeError, NoSeek, Source

T = TypeVar("T")

_UNKNOWN_LENGTH = 2**62  # libsndfile reports SF_COUNT_MAX frames for streams of unknown length
_BLOCK = 1 << 16  # samples per read when a file has to be read forward


def _mono(x: np.ndarray) -> np.ndarray:
    """(n, channels) -> (n,) float32 channel mean, the same reduction the whole-file path did."""
    return np.ascontiguousarray(x.astype(np.float32, copy=False).mean(axis=1, dtype=np.float32))


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


class SoundfileAudio:
    """Sample spans through libsndfile: the length from the header, each span read after a seek.

    A file libsndfile can not seek, whose length it does not know, or in Ogg (libsndfile's Vorbis seeks
    are not sample exact, libsndfile issue #885: spans came back shifted by up to a block) is read
    forward block by block instead, keeping only the spans: whole-file decode time, span-sized memory.
    """

    def __init__(self, p: Source) -> None:
        self.p = p
        self.f = sf.SoundFile(p.open())
        self.sr = int(self.f.samplerate)
        self.seekable = bool(self.f.seekable()) and self.f.format != "OGG"
        frames = int(self.f.frames)  # a header that overstates it is caught by the short read that follows
        self.n = frames if 0 <= frames < _UNKNOWN_LENGTH else sum(len(x) for x in self._blocks())

    def _blocks(self) -> Iterator[np.ndarray]:
        """Mono blocks from the start of a fresh handle (the open one may not rewind)."""
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


class AvAudio:
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
        import av  # deferred: PyAV (FFmpeg) costs ~0.1 s to import and only what libsndfile can not read needs it

        self.p = p
        self.container = av.open(p.open(), mode="r")
        try:
            if not self.container.streams.audio:
                raise MediaDecodeError(p.label, "no audio stream")
            s = self.container.streams.audio[0]
            self.stream = s
            self.sr = int(s.codec_context.sample_rate or s.rate)
            first = next(self.container.decode(s), None)
            if first is None:
                raise MediaDecodeError(p.label, "audio stream has no decodable samples")
            self.origin = None if first.pts is None else _seconds(first.pts, first.time_base)
            self.seeks = (
                self.origin is not None
                and s.time_base is not None
                and (1 / (s.time_base * self.sr)).denominator == 1
                and bool(_SAMPLE_INDEXED & set(self.container.format.name.split(",")))
            )
            n = self._tail_length() if self.seeks else None
            if n is None:
                self.seeks = False
                n = sum(len(x) for x in self._forward())
            self.n = n
        except BaseException:
            self.container.close()
            raise

    def _timestamps(self) -> tuple[Fraction, Fraction]:
        """The first frame's time and the stream's time base: what seeking counts by (known when ``self.seeks``)."""
        if self.origin is None or self.stream.time_base is None:
            raise NoSeek("the stream has no timestamps to seek by")
        return self.origin, self.stream.time_base

    def _forward(self) -> Iterator[np.ndarray]:
        """Mono samples from the start of a fresh container, in order (positions by count, as the whole-file path)."""
        import av  # deferred: PyAV (FFmpeg) costs ~0.1 s to import and only what libsndfile can not read needs it

        with av.open(self.p.open(), mode="r") as container:
            stream = container.streams.audio[0]
            resampler = av.AudioResampler(format="fltp", layout=None, rate=self.sr)
            frames = (out for frame in container.decode(stream) for out in resampler.resample(frame))
            for out in itertools.chain(frames, resampler.resample(None)):
                yield _mono(out.to_ndarray().T)

    def _from(self, at: Fraction) -> Iterator[tuple[int, np.ndarray]]:
        """(position, mono samples) after a seek to ``at`` seconds, positions from the first frame's pts."""
        import av  # deferred: PyAV (FFmpeg) costs ~0.1 s to import and only what libsndfile can not read needs it

        s = self.stream
        origin, time_base = self._timestamps()
        self.container.seek(int(math.floor(at / time_base)), stream=s)
        resampler = av.AudioResampler(format="fltp", layout=None, rate=self.sr)
        pos = None
        for frame in self.container.decode(s):
            if pos is None:
                if frame.pts is None:
                    raise NoSeek("a frame without pts")
                pos = round((_seconds(frame.pts, frame.time_base) - origin) * self.sr)
            for out in resampler.resample(frame):
                x = _mono(out.to_ndarray().T)
                yield pos, x
                pos += len(x)

    def _tail_length(self) -> int | None:
        """Samples a whole decode yields: decode the last seconds (the header's duration is only an estimate)."""
        import av  # deferred: PyAV (FFmpeg) costs ~0.1 s to import and only what libsndfile can not read needs it

        s = self.stream
        origin, time_base = self._timestamps()
        if s.duration:
            duration = s.duration * time_base
        elif self.container.duration:
            duration = Fraction(self.container.duration, av.time_base)
        else:
            return None
        try:
            end = None
            for pos, x in self._from(origin + max(duration - 5, Fraction(0))):
                end = pos + len(x)
            return end
        except Exception:  # a demuxer that can not seek: count forward instead
            return None

    def _seek_read(self, lo: int, hi: int) -> np.ndarray:
        preroll = self.PREROLL
        origin, _ = self._timestamps()
        for _ in range(3):
            at = origin + max(Fraction(lo, self.sr) - preroll, Fraction(0))
            run = self._from(at)
            first = next(run, None)
            if (
                first is not None and first[0] <= lo - preroll * self.sr / 2
            ):  # at least half the pre-roll decoded
                return _collect(itertools.chain([first], run), [(lo, hi)])[0]
            if at == origin:
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


def _seconds(pts: int, time_base: Fraction | None) -> Fraction:
    """A timestamp in seconds; a frame without a time base can not be placed."""
    if time_base is None:
        raise NoSeek("a frame without a time base")
    return pts * time_base


def with_reader(p: Source, read: Callable[[SoundfileAudio | AvAudio], T]) -> T:
    """``read(reader)`` through soundfile, else (it can not open or read the file) through PyAV."""
    try:
        reader: SoundfileAudio | AvAudio = SoundfileAudio(p)
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
        reader = AvAudio(p)
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
