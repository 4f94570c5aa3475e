"""Peak memory and wall time of load_audio / load_video on long media, clip-span decoding against the
old whole-file approach (re-implemented below as the "before" reference), measured in one run.

    .venv/bin/python benchmarks/long_media_memory.py [--audio-minutes 60] [--video-minutes 60] [--keep DIR]

Generates under a temp dir a 44.1 kHz *stereo* 16-bit WAV of --audio-minutes (one hour: 635 MB on disk,
the size issue 11 quotes ~1.9 GB of whole-file decoding for) and a 64x48, 25 fps H.264 MP4 (libx264
defaults: GOP 250, B-frames) of --video-minutes. Every measurement runs in its own child process so
peaks do not mix (torch on one thread): wall time and peak RSS of one call (RSS above the child's level
after imports and a warm-up call), then the peak of tracemalloc (numpy and Python allocations; torch
tensors are not traced) over a second call. Outputs of old and new are compared, and the frames each
video path decodes are counted. Figures are for this machine, this run.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


# --------------------------------------------------------------------------------------------------
# the old whole-file approach ("before"), as nextgpt/encoders/preprocess/ had it before issue 11
# --------------------------------------------------------------------------------------------------
def old_load_audio(path: Path, num_clips: int = 3, clip_duration: float = 2.0, sample_rate: int = 16000):
    """Read the whole file (soundfile, else PyAV), average channels, resample all of it, then cut the clips."""
    import soundfile as sf
    import torch
    import torch.nn.functional as F

    from nextgpt.encoders.preprocess import kaldi_fbank, resample
    from nextgpt.encoders.preprocess.common import clip_starts as _clip_starts

    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except sf.LibsndfileError:
        import av

        with av.open(str(path)) as container:
            stream = container.streams.audio[0]
            sr = stream.codec_context.sample_rate
            resampler = av.AudioResampler(format="fltp", layout=None, rate=sr)
            chunks = [o.to_ndarray() for f in container.decode(stream) for o in resampler.resample(f)]
        data = np.concatenate(chunks, axis=1).T.astype(np.float32)
    waveform = torch.from_numpy(np.ascontiguousarray(data.mean(axis=1, dtype=np.float32))).unsqueeze(0)
    del data
    if sr != sample_rate:
        waveform = resample(waveform, sr, sample_rate)
    duration = waveform.shape[1] / sample_rate
    clips = []
    for start in _clip_starts(duration, clip_duration, num_clips):
        end = start + Fraction(clip_duration)
        clip = waveform[:, int(start * sample_rate) : int(end * sample_rate)]
        clip -= clip.mean()
        fbank = kaldi_fbank(clip, sample_rate, 128).transpose(0, 1)
        pad = 204 - fbank.shape[1]
        fbank = F.pad(fbank, (0, pad)) if pad > 0 else fbank[:, :204]
        clips.append(((fbank - -4.268) / 9.138).unsqueeze(0))
    return torch.stack(clips, dim=0)


def old_load_video(path: Path, num_clips: int = 5, clip_duration: float = 2.0, frames_per_clip: int = 2):
    """Count packets, then decode every frame from the start up to the last wanted one (no seeking)."""
    import av
    import torch

    from nextgpt.encoders.preprocess import video as pre

    p = pre.existing_source(path)
    with av.open(str(path)) as container:  # the old probe: a count and a rate, no timestamps kept
        stream = container.streams.video[0]
        count = sum(1 for pkt in container.demux(stream) if pkt.size > 0)
        fps = float(stream.average_rate or stream.guessed_rate)
    per_clip = pre._video_frame_indices(count, fps, num_clips, clip_duration, frames_per_clip)
    frames, _ = pre._grab_sequential(p, {i for idxs in per_clip for i in idxs})  # the old _grab, unchanged
    out = []
    for idxs in per_clip:
        clip = torch.from_numpy(np.stack([frames[i] for i in idxs])).permute(3, 0, 1, 2).float()
        clip = pre._short_side_scale(clip / 255.0, pre.IMAGE_SIZE)
        clip = pre.normalize_channels(clip, pre.CLIP_MEAN, pre.CLIP_STD, dim=0)
        out.extend(pre._uniform_crop(clip, pre.IMAGE_SIZE, k) for k in (0, 1, 2))
    return torch.stack(out, dim=0).contiguous()


# --------------------------------------------------------------------------------------------------
# media generation
# --------------------------------------------------------------------------------------------------
def write_wav(path: Path, minutes: float, sr: int = 44100, channels: int = 2) -> None:
    """16-bit PCM: a slow chirp plus noise, written 10 s at a time."""
    import soundfile as sf

    n = int(minutes * 60 * sr)
    with sf.SoundFile(path, "w", sr, channels, subtype="PCM_16") as f:
        for start in range(0, n, 10 * sr):
            m = min(10 * sr, n - start)
            t = (start + np.arange(m)) / sr
            tone = 0.3 * np.sin(2 * np.pi * (200 + 0.05 * t) * t)
            noise = np.random.default_rng(start).standard_normal((m, channels)) * 0.05
            f.write((tone[:, None] + noise).astype(np.float32))


def write_mp4(path: Path, minutes: float, fps: int = 25, width: int = 64, height: int = 48) -> None:
    """libx264 (ultrafast, otherwise defaults) of a moving ramp with a per-frame block."""
    import av

    n = int(minutes * 60 * fps)
    ramp = (np.arange(width, dtype=np.int64)[None, :, None] * 4) % 256
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps, options={"preset": "ultrafast", "bf": "3"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(n):
            img = np.broadcast_to(((ramp + i) % 256).astype(np.uint8), (height, width, 3)).copy()
            img[: height // 2, : width // 2] = (i * 37) % 256
            for pkt in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(pkt)
        for pkt in stream.encode():
            out.mux(pkt)


# --------------------------------------------------------------------------------------------------
# child: one measurement
# --------------------------------------------------------------------------------------------------
def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child(kind: str, impl: str, path: Path, warm: Path, out: Path) -> None:
    import tracemalloc

    import torch

    torch.set_num_threads(1)
    from nextgpt.encoders.preprocess import load_audio, load_video

    fn = {
        ("audio", "old"): old_load_audio,
        ("audio", "new"): load_audio,
        ("video", "old"): old_load_video,
        ("video", "new"): load_video,
    }[kind, impl]
    fn(warm)  # imports, kernels, codec setup: the baseline below includes them
    base = _rss_mb()
    t0 = time.perf_counter()
    result = fn(path)
    wall = time.perf_counter() - t0
    peak = _rss_mb()
    tracemalloc.start()
    fn(path)
    traced = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    torch.save(result, out)
    print(json.dumps({"wall_s": wall, "rss_base_mb": base, "rss_peak_mb": peak, "traced_peak_mb": traced}))


def measure(kind: str, impl: str, path: Path, warm: Path, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, impl, str(path), str(warm), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind}/{impl} child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--audio-minutes", type=float, default=60.0)
    ap.add_argument("--video-minutes", type=float, default=60.0)
    ap.add_argument(
        "--keep", type=Path, default=None, help="write (and reuse) the media here instead of a temp dir"
    )
    ap.add_argument("--child", nargs=5, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, impl, path, warm, out = args.child
        child(kind, impl, Path(path), Path(warm), Path(out))
        return
    import torch

    tmp = tempfile.TemporaryDirectory()
    folder = args.keep or Path(tmp.name)
    folder.mkdir(parents=True, exist_ok=True)
    wav, mp4 = folder / f"long_{args.audio_minutes:g}min.wav", folder / f"long_{args.video_minutes:g}min.mp4"
    warm_wav, warm_mp4 = folder / "warm.wav", folder / "warm.mp4"
    for path, write, minutes in (
        (wav, write_wav, args.audio_minutes),
        (mp4, write_mp4, args.video_minutes),
        (warm_wav, write_wav, 0.2),
        (warm_mp4, write_mp4, 0.2),
    ):
        if not path.exists():
            t0 = time.perf_counter()
            write(path, minutes)
            print(
                f"wrote {path.name}: {path.stat().st_size / 2**20:.0f} MiB in {time.perf_counter() - t0:.0f} s"
            )
    rows = []
    for kind, path, warm in (("audio", wav, warm_wav), ("video", mp4, warm_mp4)):
        results = {}
        for impl in ("old", "new"):
            out = folder / f"{kind}_{impl}.pt"
            results[impl] = measure(kind, impl, path, warm, out)
            results[impl]["tensor"] = torch.load(out, weights_only=True)
        diff = (results["old"]["tensor"] - results["new"]["tensor"]).abs().max().item()
        for impl in ("old", "new"):
            r = results[impl]
            rows.append(
                (
                    kind,
                    impl,
                    r["wall_s"],
                    r["rss_peak_mb"] - r["rss_base_mb"],
                    r["rss_peak_mb"],
                    r["traced_peak_mb"],
                    diff,
                )
            )
    print(
        f"\naudio: {wav.name} (44.1 kHz stereo PCM_16, {wav.stat().st_size / 2**20:.0f} MiB); "
        f"video: {mp4.name} (64x48 25 fps H.264, {mp4.stat().st_size / 2**20:.0f} MiB)"
    )
    header = ("media", "impl", "wall s", "RSS +MiB", "RSS peak", "traced MiB", "max |old-new|")
    print(
        f"{header[0]:6} {header[1]:4} {header[2]:>8} {header[3]:>9} {header[4]:>9} {header[5]:>11} {header[6]:>14}"
    )
    for kind, impl, wall, rss_up, rss, traced, diff in rows:
        print(f"{kind:6} {impl:4} {wall:8.2f} {rss_up:9.0f} {rss:9.0f} {traced:11.2f} {diff:14.3g}")
    from nextgpt.encoders.preprocess import video as pre

    src = pre.existing_source(mp4)
    t0 = time.perf_counter()
    index = pre._probe_video(src)
    probe = time.perf_counter() - t0
    wanted = {i for idxs in pre._video_frame_indices(index.count, index.fps, 5, 2.0, 2) for i in idxs}
    _, before = pre._grab_sequential(src, wanted)
    _, after = pre._grab(src, wanted, index)
    keys = 0 if index.keyframes is None else len(index.keyframes)
    print(
        f"video frames decoded: old {before}, new {after} of {index.count} ({keys} keyframes); "
        f"both first demux every packet (count, and for new the timestamps): {probe:.2f} s of the new time"
    )
    if not math.isfinite(rows[0][-1]) or rows[0][-1] > 1e-3 or rows[-1][-1] > 0:
        print("WARNING: old and new outputs differ beyond the tested tolerance")


if __name__ == "__main__":
    main()
