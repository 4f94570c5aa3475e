"""ImageBind preprocessing: fbank/resampling against independent maths, crop geometry, clip sampling,
short and odd media, broken files, and every file of the real sample data through the tiny encoder."""

from __future__ import annotations

import io
import json
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F
from PIL import Image

from nextgpt import modality as modality_registry
from nextgpt.encoders.imagebind import ImageBindModel
from nextgpt.encoders.imagebind_config import ImageBindConfig
from nextgpt.encoders.preprocess import (
    CLIP_MEAN,
    CLIP_STD,
    MediaDecodeError,
    kaldi_fbank,
    load_audio,
    load_image,
    load_video,
    resample,
)
from nextgpt.encoders.preprocess.video import _video_frame_indices

AUDIO_MEAN, AUDIO_STD = -4.268, 9.138


# ---------------------------------------------------------------------------------------------
# independent references
# ---------------------------------------------------------------------------------------------
def numpy_fbank(x: np.ndarray, sr: int, n_mels: int) -> np.ndarray:
    """Textbook Kaldi/HTK log-mel in float64: 25 ms Hann frames every 10 ms, DC removal,
    pre-emphasis 0.97, |FFT|^2 on 512 points, triangles equally spaced on 1127 ln(1 + f/700) from
    20 Hz to Nyquist, log floored at float32 eps."""
    x = x.astype(np.float64)
    win, hop = int(round(sr * 0.025)), int(round(sr * 0.010))
    nfft = 1
    while nfft < win:
        nfft *= 2
    n_frames = 1 + (len(x) - win) // hop
    frames = np.stack([x[i * hop : i * hop + win] for i in range(n_frames)])
    frames = frames - frames.mean(axis=1, keepdims=True)
    prev = np.concatenate([frames[:, :1], frames[:, :-1]], axis=1)
    frames = (frames - 0.97 * prev) * np.hanning(win)  # np.hanning is the symmetric Hann window
    power = np.abs(np.fft.rfft(frames, n=nfft)) ** 2

    def mel(f):
        return 1127.0 * np.log1p(np.asarray(f, dtype=np.float64) / 700.0)

    m = mel(np.arange(nfft // 2) * sr / nfft)  # the Nyquist bin gets no weight in Kaldi
    edges = np.linspace(mel(20.0), mel(sr / 2), n_mels + 2)
    fb = np.zeros((n_mels, nfft // 2 + 1))
    for j in range(n_mels):
        lo, c, hi = edges[j], edges[j + 1], edges[j + 2]
        fb[j, : nfft // 2] = np.clip(np.minimum((m - lo) / (c - lo), (hi - m) / (hi - c)), 0.0, None)
    return np.log(np.maximum(power @ fb.T, np.finfo(np.float32).eps))


def test_kaldi_fbank_matches_numpy_reference() -> None:
    rng = np.random.default_rng(0)
    sr = 16000
    t = np.arange(int(1.3 * sr)) / sr
    x = (0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(t.size) + 0.01).astype(np.float32)
    ours = kaldi_fbank(torch.from_numpy(x), sr, 128).numpy()
    ref = numpy_fbank(x, sr, 128)
    assert ours.shape == ref.shape == (1 + (x.size - 400) // 160, 128)
    # float32 FFT/matmul vs float64 reference: log energies agree to 1e-3 absolute
    np.testing.assert_allclose(ours, ref, atol=1e-3, rtol=0)
    # (1, n) input and other mel counts / rates work; too short for one window -> no frames
    assert kaldi_fbank(torch.from_numpy(x)[None], sr, 64).shape == (ref.shape[0], 64)
    np.testing.assert_allclose(
        kaldi_fbank(torch.from_numpy(x[:8000]), 8000, 40).numpy(),
        numpy_fbank(x[:8000], 8000, 40),
        atol=1e-3,
        rtol=0,
    )
    assert kaldi_fbank(torch.zeros(399), sr, 128).shape == (0, 128)


def test_resample_keeps_a_tone() -> None:
    for sr in (44100, 48000, 22050, 8000):
        n = int(0.5 * sr)
        t = np.arange(n) / sr
        x = torch.from_numpy(np.sin(2 * np.pi * 1000 * t).astype(np.float32))
        y = resample(x[None], sr, 16000)[0]
        assert y.shape[0] == -(-n * 16000 // sr)  # ceil(n * new / old)
        expect = np.sin(2 * np.pi * 1000 * np.arange(y.shape[0]) / 16000)
        inner = slice(200, -200)  # away from the zero-padded edges
        np.testing.assert_allclose(y.numpy()[inner], expect[inner], atol=5e-3)


# ---------------------------------------------------------------------------------------------
# image
# ---------------------------------------------------------------------------------------------
def _unnormalize(x: torch.Tensor) -> np.ndarray:
    m = torch.tensor(CLIP_MEAN)[:, None, None]
    s = torch.tensor(CLIP_STD)[:, None, None]
    return ((x * s + m) * 255).permute(1, 2, 0).numpy()


def _red_box(rgb: np.ndarray) -> tuple[int, int, int, int]:
    mask = (rgb[..., 0] > 180) & (rgb[..., 1] < 90) & (rgb[..., 2] < 90)
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())


@pytest.mark.parametrize("landscape", [True, False])
def test_image_resize_and_centre_crop_box(tmp_path: Path, landscape: bool) -> None:
    w, h = (300, 200) if landscape else (200, 300)
    arr = np.full((h, w, 3), 128, np.uint8)
    # red marker; blue marker near the long-side edge, which the centre crop must drop
    if landscape:
        arr[90:110, 100:110] = (255, 0, 0)
        arr[90:110, 10:40] = (0, 0, 255)
    else:
        arr[100:110, 90:110] = (255, 0, 0)
        arr[10:40, 90:110] = (0, 0, 255)
    path = tmp_path / "marker.png"
    Image.fromarray(arr).save(path)
    x = load_image(path)
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    rgb = _unnormalize(x)
    # by hand: scale 224/200 = 1.12 -> 336 x 224, centre offset round((336 - 224) / 2) = 56
    if landscape:
        expect = (100 * 1.12 - 56, 90 * 1.12, 110 * 1.12 - 56, 110 * 1.12)  # x0 y0 x1 y1
    else:
        expect = (90 * 1.12, 100 * 1.12 - 56, 110 * 1.12, 110 * 1.12 - 56)
    box = _red_box(rgb)
    assert abs(box[0] - expect[0]) <= 1.5 and abs(box[1] - expect[1]) <= 1.5
    assert abs(box[2] + 1 - expect[2]) <= 1.5 and abs(box[3] + 1 - expect[3]) <= 1.5
    assert not ((rgb[..., 2] > 180) & (rgb[..., 0] < 90)).any()  # the blue marker is cropped away
    np.testing.assert_allclose(rgb[5, 200], 128, atol=0.6)  # grey background survives normalisation


def test_image_modes_and_exact_size(tmp_path: Path) -> None:
    Image.new("L", (224, 224), 77).save(tmp_path / "grey.png")
    Image.new("RGBA", (500, 230), (10, 200, 30, 0)).save(tmp_path / "rgba.png")
    Image.new("P", (240, 240)).save(tmp_path / "palette.gif")
    for name in ("grey.png", "rgba.png", "palette.gif"):
        assert load_image(tmp_path / name).shape == (3, 224, 224)
    np.testing.assert_allclose(_unnormalize(load_image(tmp_path / "grey.png")), 77, atol=1e-3)


# ---------------------------------------------------------------------------------------------
# audio
# ---------------------------------------------------------------------------------------------
def test_short_stereo_44k_audio(tmp_path: Path) -> None:
    sr = 44100
    t = np.arange(int(0.5 * sr)) / sr
    left, right = 0.4 * np.sin(2 * np.pi * 300 * t), 0.2 * np.sin(2 * np.pi * 300 * t + 0.3)
    path = tmp_path / "short.wav"
    sf.write(path, np.stack([left, right], axis=1).astype(np.float32), sr)
    x = load_audio(path)
    assert x.shape == (3, 1, 128, 204) and torch.isfinite(x).all()
    # 0.5 s at 16 kHz = 8000 samples -> 1 + (8000 - 400) // 160 = 48 real frames, zero padding after
    n_real = 1 + (8000 - 400) // 160
    torch.testing.assert_close(x[..., n_real:], torch.full_like(x[..., n_real:], -AUDIO_MEAN / AUDIO_STD))
    assert (x[..., :n_real] != -AUDIO_MEAN / AUDIO_STD).any()
    torch.testing.assert_close(x[1], x[0], atol=1e-4, rtol=0)  # all clips start at 0 for short audio
    assert load_audio(path, num_clips=2, num_mel_bins=64, target_length=100).shape == (2, 1, 64, 100)


def test_audio_clips_are_evenly_spaced(tmp_path: Path) -> None:
    """ConstantClipsPerVideoSampler: 3 clips of 2 s in 10 s start at k * (10 - 2) / 3 = 0, 2.67, 5.33 s
    (so the last 2.67 s are never seen; a (N - 1) spacing would put the last clip at 8-10 s)."""
    sr = 16000
    x = np.zeros(10 * sr, np.float32)
    tone = 0.5 * np.sin(2 * np.pi * 500 * np.arange(sr // 2) / sr)
    for start in (3.0, 6.0, 8.5):  # inside clip 1, inside clip 2, after every clip
        x[int(start * sr) : int(start * sr) + tone.size] = tone
    path = tmp_path / "ten.wav"
    sf.write(path, x, sr)
    spec = load_audio(path)
    silent = (np.log(np.finfo(np.float32).eps) - AUDIO_MEAN) / AUDIO_STD
    n_real = 1 + (2 * sr - 400) // 160  # 198 frames of signal, then zero padding (0 before normalising)
    torch.testing.assert_close(
        spec[..., n_real:], torch.full_like(spec[..., n_real:], -AUDIO_MEAN / AUDIO_STD)
    )
    loud = [(spec[k, 0, :, :n_real].amax(0) > silent + 1).nonzero().flatten() for k in range(3)]
    assert loud[0].numel() == 0  # clip 0 (0-2 s) is silence
    # tone at 3.0 s is 0.33 s into clip 1 (frame ~33); at 6.0 s it is 0.67 s into clip 2 (frame ~67);
    # each lasts 0.5 s (~50 frames) and the 8.5 s tone appears nowhere
    for k, first in ((1, 100 / 3), (2, 200 / 3)):
        assert abs(loud[k].min().item() - first) <= 3, k
        assert abs(loud[k].max().item() - (first + 50)) <= 3, k


# ---------------------------------------------------------------------------------------------
# video
# ---------------------------------------------------------------------------------------------
def write_video(path: Path, width: int, height: int, fps: int, seconds: float) -> None:
    """Frames with a red band at the start of the long side, blue at its end, a grey middle whose
    brightness grows with the frame number."""
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        n = int(round(fps * seconds))
        for i in range(n):
            img = np.full((height, width, 3), 20 + int(200 * i / max(n - 1, 1)), np.uint8)
            if width >= height:
                img[:, : width // 5] = (230, 20, 20)
                img[:, -width // 5 :] = (20, 20, 230)
            else:
                img[: height // 5] = (230, 20, 20)
                img[-height // 5 :] = (20, 20, 230)
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            for pkt in stream.encode(frame):
                out.mux(pkt)
        for pkt in stream.encode():
            out.mux(pkt)


@pytest.mark.parametrize("size", [(90, 160), (160, 90)], ids=["portrait", "landscape"])
def test_video_shapes_crops_and_frames(tmp_path: Path, size: tuple[int, int]) -> None:
    w, h = size
    path = tmp_path / f"clip_{w}x{h}.mp4"
    write_video(path, w, h, fps=12, seconds=1.0)
    x = load_video(path)
    assert x.shape == (15, 3, 2, 224, 224) and torch.isfinite(x).all()
    rgb = [_unnormalize(x[k, :, 1]) for k in range(3)]  # clip 0, crops 0/1/2, second frame

    def band(
        img: np.ndarray, first: bool
    ) -> np.ndarray:  # 20-pixel strip at the start / end of the long side
        if w >= h:
            return img[:, :20] if first else img[:, -20:]
        return img[:20] if first else img[-20:]

    red0, blue2 = band(rgb[0], True).mean((0, 1)), band(rgb[2], False).mean((0, 1))
    assert red0[0] > 150 and red0[2] < 80  # crop 0 = left / top, holds the red band
    assert blue2[2] > 150 and blue2[0] < 80  # crop 2 = right / bottom, holds the blue band
    centre = rgb[1][100:124, 100:124]
    assert np.abs(centre[..., 0] - centre[..., 2]).mean() < 25  # centre crop: grey middle
    # a 1 s video: every clip starts at 0 and takes its first and last frame (dark, then bright)
    first = _unnormalize(x[1, :, 0])[100:124, 100:124].mean()
    last = _unnormalize(x[1, :, 1])[100:124, 100:124].mean()
    assert first < 50 and last > 180
    torch.testing.assert_close(x[0], x[3])
    assert load_video(path, num_clips=2, num_crops=1, frames_per_clip=3).shape == (2, 3, 3, 224, 224)


def test_video_frame_indices_by_hand() -> None:
    # 100 frames at 10 fps = 10 s; 5 clips of 2 s start at k * 8 / 5 = 0, 1.6, 3.2, 4.8, 6.4 s;
    # frames [ceil(10 * start), ceil(10 * (start + 2))) and their first/last frame are taken
    assert _video_frame_indices(100, 10.0, 5, 2.0, 2) == [[0, 19], [16, 35], [32, 51], [48, 67], [64, 83]]
    # 12 frames at 12 fps: shorter than a clip -> frames 0 and 11 every time
    assert _video_frame_indices(12, 12.0, 5, 2.0, 2) == [[0, 11]] * 5
    assert _video_frame_indices(1, 25.0, 2, 2.0, 2) == [[0, 0]] * 2


# ---------------------------------------------------------------------------------------------
# broken files
# ---------------------------------------------------------------------------------------------
def _damaged(tmp_path: Path) -> dict[str, tuple[str, Path]]:
    jpg = tmp_path / "truncated.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (240, 320, 3), dtype=np.uint8)).save(
        jpg, quality=95
    )
    data = jpg.read_bytes()
    jpg.write_bytes(data[: len(data) // 2])
    wav = tmp_path / "empty.wav"
    sf.write(wav, np.zeros((0, 1), np.float32), 16000)
    mp4 = tmp_path / "zero_frames.mp4"
    with av.open(str(mp4), "w") as out:
        s = out.add_stream("mpeg4", rate=12)
        s.width, s.height, s.pix_fmt = 64, 64, "yuv420p"
    txt = tmp_path / "notes.mp4"
    txt.write_text("this is a text file, not a video\n" * 20)
    return {
        "truncated jpeg": ("image", jpg),
        "empty wav": ("audio", wav),
        "zero-frame mp4": ("video", mp4),
        "text as mp4": ("video", txt),
    }


def test_damaged_files_raise_media_decode_error(tmp_path: Path) -> None:
    for kind, (modality, path) in _damaged(tmp_path).items():
        with pytest.raises(MediaDecodeError) as e:
            modality_registry.get(modality).load(path)
        assert str(path) in str(e.value), kind
        assert e.value.path == str(path) and e.value.reason, kind
        assert isinstance(e.value, ValueError)
    for modality in ("image", "audio", "video"):
        with pytest.raises(MediaDecodeError, match="does not exist"):
            modality_registry.get(modality).load(tmp_path / "missing.bin")
    with pytest.raises(KeyError, match="unknown modality 'thermal'"):
        modality_registry.get("thermal")


# ---------------------------------------------------------------------------------------------
# real sample data through the tiny ImageBind
# ---------------------------------------------------------------------------------------------
REAL = [
    ("cc3m", "image_name", "images", "image", "vision"),
    ("audiocap", "audio_name", "audios", "audio", "audio"),
    ("webvid", "video_name", "videos", "video", "vision"),
]


@pytest.fixture(scope="module")
def tiny_model() -> ImageBindModel:
    torch.manual_seed(0)
    return ImageBindModel(ImageBindConfig.tiny()).eval()


@pytest.mark.real_data
@pytest.mark.parametrize("dataset,key,folder,media,modality", REAL, ids=[r[0] for r in REAL])
def test_real_samples_encode(
    sample_root: Path,
    tiny_model: ImageBindModel,
    dataset: str,
    key: str,
    folder: str,
    media: str,
    modality: str,
) -> None:
    records = json.loads((sample_root / dataset / f"{dataset}.json").read_text())
    names = sorted({r[key] for r in records})
    assert names, f"{dataset}.json lists no {key}"
    scale = 20.0 if modality == "audio" else 1.0
    for name in names:
        x = modality_registry.get(media).load(sample_root / dataset / folder / name)
        assert torch.isfinite(x).all(), name
        with torch.no_grad():
            emb = tiny_model.encode(modality, x[None])
            unit = tiny_model.encode(modality, x[None], renormalize=True)
        assert emb.shape == unit.shape == (1, tiny_model.embed_dim), name
        assert torch.isfinite(emb).all(), name
        torch.testing.assert_close(unit.norm(dim=-1), torch.ones(1), atol=1e-5, rtol=0)
        norm = emb.norm(dim=-1).item()
        if media == "image":
            assert norm == pytest.approx(1.0, abs=1e-5), name
        else:  # mean over clips of vectors of norm `scale`
            assert 0.0 < norm <= scale * (1 + 1e-5), name


# ---------------------------------------------------------------------------------------------
# long media: only the clips are decoded (issue 11, bounded memory)
# ---------------------------------------------------------------------------------------------
def whole_file_audio(path: Path, num_clips: int = 3, clip_duration: float = 2.0) -> torch.Tensor:
    """The pre-issue-11 load_audio: read and resample the whole file, then cut the clips as views of it
    (in-place DC removal, so overlapping clips see their predecessors'). Its pieces (resample,
    kaldi_fbank) are checked against independent maths above."""
    from fractions import Fraction

    try:
        data, sr = sf.read(path, dtype="float32", always_2d=True)
    except sf.LibsndfileError:
        with av.open(str(path)) as container:
            stream = container.streams.audio[0]
            sr = stream.codec_context.sample_rate
            resampler = av.AudioResampler(format="fltp", layout=None, rate=sr)
            chunks = [
                out.to_ndarray() for frame in container.decode(stream) for out in resampler.resample(frame)
            ]
        data = np.concatenate(chunks, axis=1).T.astype(np.float32)
    wave = torch.from_numpy(np.ascontiguousarray(data.mean(axis=1, dtype=np.float32)))[None]
    wave = resample(wave, sr, 16000)
    duration = wave.shape[1] / 16000
    step = Fraction(max(duration - Fraction(clip_duration), 0)) / num_clips
    clips = []
    for k in range(num_clips):
        start = step * k
        clip = wave[:, int(start * 16000) : int((start + Fraction(clip_duration)) * 16000)]
        clip -= clip.mean()
        fbank = kaldi_fbank(clip, 16000, 128).T
        fbank = F.pad(fbank, (0, 204 - fbank.shape[1])) if fbank.shape[1] < 204 else fbank[:, :204]
        clips.append(((fbank - AUDIO_MEAN) / AUDIO_STD)[None])
    return torch.stack(clips)


def broadband(start: int, n: int, sr: int, channels: int) -> np.ndarray:
    """(n, channels) float32 from sample ``start`` of one deterministic signal: a slow chirp plus noise."""
    t = (start + np.arange(n)) / sr
    tone = 0.3 * np.sin(2 * np.pi * (200 + 3 * t) * t)
    noise = np.random.default_rng(start).standard_normal((n, channels)) * 0.05
    return (tone[:, None] * np.linspace(1.0, 0.5, channels)[None] + noise).astype(np.float32)


def write_long_wav(path: Path, sr: int, seconds: float, channels: int = 1, subtype: str = "PCM_16") -> int:
    """Write in 10 s blocks so the test itself never holds the whole signal; returns the frame count."""
    n = int(sr * seconds)
    with sf.SoundFile(path, "w", sr, channels, subtype=subtype) as f:
        for start in range(0, n, 10 * sr):
            f.write(broadband(start, min(10 * sr, n - start), sr, channels))
    return n


# Tolerance for span-read vs whole-file audio: the waveform samples come out identical up to float32
# summation order in conv1d (1 ulp, the convolution is run on a shorter input); log-mel bands that the
# resampling leaves nearly empty (above an 8 kHz file's Nyquist) turn that into ~2e-4 after normalising.
SPAN_ATOL = 1e-3


@pytest.mark.parametrize(
    "sr,seconds,channels",
    [(44100, 0.5, 2), (48000, 7.0, 1), (22050, 8.0, 2), (8000, 31.7, 1), (16000, 12.3, 1), (44100, 61.3, 2)],
)
def test_audio_spans_match_whole_file_path(tmp_path: Path, sr: int, seconds: float, channels: int) -> None:
    """Short, overlapping-clip (< 8 s), resampled up / down / not at all: the span path gives the whole-file values."""
    path = tmp_path / "a.wav"
    write_long_wav(path, sr, seconds, channels)
    for num_clips, clip_duration in ((3, 2.0), (5, 1.3)):
        expect = whole_file_audio(path, num_clips, clip_duration)
        got = load_audio(path, num_clips=num_clips, clip_duration=clip_duration)
        torch.testing.assert_close(got, expect, atol=SPAN_ATOL, rtol=0)
    torch.testing.assert_close(load_audio(path.read_bytes()), load_audio(path), atol=0, rtol=0)


def test_long_wav_reads_only_the_clips(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """12 minutes of 44.1 kHz: the clips equal the whole-file path's, and soundfile hands over only the clips'
    samples (plus the resampling filter's margin): traced memory stays far below the file's float32 size."""
    import tracemalloc

    sr, seconds = 44100, 12 * 60
    path = tmp_path / "long.wav"
    n = write_long_wav(path, sr, seconds)
    read_frames = []
    real_read = sf.SoundFile.read

    def counting_read(self, frames=-1, *args, **kwargs):
        out = real_read(self, frames, *args, **kwargs)
        read_frames.append(len(out))
        return out

    monkeypatch.setattr(sf.SoundFile, "read", counting_read)
    tracemalloc.start()
    try:
        got = load_audio(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    whole_bytes = n * 4  # the float32 mono waveform the whole-file path held (before resampling)
    assert sum(read_frames) < 3 * 2.1 * sr  # three 2 s clips and a few ms of filter margin each
    assert peak < whole_bytes / 20, (peak, whole_bytes)  # ~2 MB: a few copies of the clips' 1 MB
    monkeypatch.setattr(sf.SoundFile, "read", real_read)
    torch.testing.assert_close(got, whole_file_audio(path), atol=SPAN_ATOL, rtol=0)


def test_audio_read_forward_when_soundfile_can_not_seek(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unseekable handle (or Ogg, whose libsndfile seeks are not sample exact) is read forward block by block:
    same values, no seek. A non-seekable file object is read into memory first and works as well."""
    path = tmp_path / "a.wav"
    write_long_wav(path, 44100, 40.0, 2)
    expect = load_audio(path)

    real_seek = sf.SoundFile.seek

    def no_seek(self, frames, whence=io.SEEK_SET):
        if (frames, whence) != (0, io.SEEK_CUR):  # soundfile's tell() is seek(0, SEEK_CUR)
            raise AssertionError("seek on a handle that should be read forward")
        return real_seek(self, frames, whence)

    with monkeypatch.context() as m:
        m.setattr(sf.SoundFile, "seekable", lambda self: False)
        m.setattr(sf.SoundFile, "seek", no_seek)
        torch.testing.assert_close(load_audio(path), expect, atol=0, rtol=0)

    class Pipe(io.RawIOBase):
        def __init__(self, data: bytes) -> None:
            self._buf = io.BytesIO(data)
            self.name = "pipe.wav"

        def readable(self) -> bool:
            return True

        def seekable(self) -> bool:
            return False

        def readinto(self, b) -> int:
            return self._buf.readinto(b)

    torch.testing.assert_close(load_audio(Pipe(path.read_bytes())), expect, atol=0, rtol=0)
    ogg = tmp_path / "a.ogg"
    sf.write(ogg, broadband(0, 44100 * 30, 44100, 2), 44100, format="OGG", subtype="VORBIS")
    expect = whole_file_audio(ogg, 7, 3.0)
    with monkeypatch.context() as m:
        m.setattr(sf.SoundFile, "seek", no_seek)
        got = load_audio(ogg, num_clips=7, clip_duration=3.0)
    torch.testing.assert_close(got, expect, atol=SPAN_ATOL, rtol=0)


def write_av_audio(path: Path, codec: str, sr: int, seconds: float) -> None:
    """Mono audio through a PyAV encoder (formats libsndfile can not open), fed 4096-sample blocks."""
    dtypes = {
        "flt": np.float32,
        "fltp": np.float32,
        "s16": np.int16,
        "s16p": np.int16,
        "s32": np.int32,
        "s32p": np.int32,
    }
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=sr, layout="mono")
        fmt = stream.codec_context.format.name
        dtype = dtypes[fmt]
        n = int(sr * seconds)
        for start in range(0, n, 4096):
            x = broadband(start, min(4096, n - start), sr, 1)[:, 0]
            if dtype is not np.float32:
                x = (x * 0.9 * np.iinfo(dtype).max).astype(dtype)
            frame = av.AudioFrame.from_ndarray(x[None], format=fmt, layout="mono")
            frame.sample_rate, frame.pts = sr, start
            for pkt in stream.encode(frame):
                out.mux(pkt)
        for pkt in stream.encode(None):
            out.mux(pkt)


@pytest.mark.parametrize(
    "codec,suffix,seeks", [("alac", "m4a", True), ("aac", "m4a", True), ("flac", "mka", False)]
)
def test_pyav_audio_decodes_only_the_clips(tmp_path: Path, codec: str, suffix: str, seeks: bool) -> None:
    """Formats only PyAV reads: with sample-exact timestamps (MP4) each clip is decoded after a seek, the length
    from the last frames; Matroska's millisecond stamps are decoded forward instead (still span-sized memory)."""
    import tracemalloc

    from nextgpt.encoders.preprocess.audio_readers import AvAudio
    from nextgpt.encoders.preprocess.common import existing_source

    path = tmp_path / f"long.{suffix}"
    write_av_audio(path, codec, 44100, 5 * 60)
    reader = AvAudio(existing_source(path))
    try:
        assert reader.seeks is seeks
    finally:
        reader.close()
    tracemalloc.start()
    try:
        got = load_audio(path, num_clips=4)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 44100 * 5 * 60 * 4 / 10, peak  # ~2-3 MB; the whole-file path held 53 MB of float32 samples
    # AAC after a seek: the decoder's state is rebuilt by the pre-roll; on this broadband signal the
    # clips match to the span tolerance (PNS noise bands would differ at the 1e-5 level of the waveform)
    torch.testing.assert_close(got, whole_file_audio(path, 4), atol=SPAN_ATOL, rtol=0)


@pytest.mark.parametrize(
    "codec,options",
    [("mpeg4", {"g": "50"}), ("libx264", {"preset": "ultrafast", "bf": "3", "g": "60"})],
    ids=["mpeg4", "h264-bframes"],
)
def test_long_video_decodes_only_the_clips(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, codec: str, options: dict[str, str]
) -> None:
    """15 minutes at 10 fps: seeking to the keyframe before each wanted frame gives the frames (bit for bit) and
    the tensor that decoding from the start gives, while decoding a small part of the video."""
    from nextgpt.encoders.preprocess import video as preprocess_video
    from nextgpt.encoders.preprocess.common import NoSeek, existing_source

    path = tmp_path / "long.mp4"
    fps, n, w, h = 10, 15 * 60 * 10, 32, 24
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=fps, options=options)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        ramp = np.arange(w, dtype=np.uint8)[None, :, None]
        for i in range(n):
            img = np.broadcast_to((ramp * 7 + i % 256).astype(np.uint8), (h, w, 3)).copy()
            img[: h // 2, : w // 2] = (i * 37) % 256  # a block that changes every frame
            for pkt in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(pkt)
        for pkt in stream.encode():
            out.mux(pkt)
    p = existing_source(path)
    index = preprocess_video._probe_video(p)
    assert index.count == n and index.pts is not None
    wanted = {i for idxs in _video_frame_indices(index.count, index.fps, 5, 2.0, 2) for i in idxs}
    seeking, decoded = preprocess_video._grab_seeking(p, wanted, index)
    forward, _ = preprocess_video._grab_sequential(p, wanted)
    assert seeking.keys() == forward.keys() == wanted
    for i in wanted:
        np.testing.assert_array_equal(seeking[i], forward[i], err_msg=f"frame {i}")
    assert decoded < n / 10, decoded  # five clips' GOPs, not the 9000 frames up to the last clip
    got = load_video(path)

    def refuse(*args, **kwargs):
        raise NoSeek("forced forward decode")

    monkeypatch.setattr(preprocess_video, "_grab_seeking", refuse)
    assert torch.equal(got, load_video(path))
