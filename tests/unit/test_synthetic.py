"""The synthetic data set: real NExT-GPT layout, and captions that are true of their media."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

from nextgpt.world.synthetic import (
    BACKGROUNDS,
    CAPTION_VOCABULARY,
    COLOURS,
    MODALITIES,
    PITCHES,
    POSITIONS,
    SHAPE_HALF,
    main,
    write_synthetic,
)

NUM = 12
MEDIA_DIRS = {"image": "images", "audio": "audios", "video": "videos"}
REAL = {"image": "cc3m", "audio": "audiocap", "video": "webvid"}
SUFFIXES = ("", "_comprehension", "_generation")


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One generated set shared by the read-only tests (generation is the slow part)."""
    return write_synthetic(tmp_path_factory.mktemp("synth"), num_per_modality=NUM, seed=0)


def load(folder: Path, suffix: str = "") -> list[dict]:
    return json.loads((folder / f"{folder.name}{suffix}.json").read_text())


def nearest_colour(rgb: np.ndarray) -> str:
    return min(COLOURS, key=lambda c: float(np.sum((np.asarray(COLOURS[c], float) - rgb) ** 2)))


# --------------------------------------------------------------------------- layout


def test_layout_counts_and_files_exist(synth: dict[str, Path]) -> None:
    assert set(synth) == set(MODALITIES)
    for m, folder in synth.items():
        assert folder.name == f"synthetic_{m}"
        media = folder / MEDIA_DIRS[m]
        assert len(list(media.iterdir())) == NUM
        plain, comp, gen = (load(folder, s) for s in SUFFIXES)
        assert len(plain) == len(comp) == len(gen) == NUM
        for rec in plain:
            assert (media / rec[f"{m}_name"]).is_file()
            assert re.fullmatch(r"(img|aud|vid)_\d{6}", rec["id" if m != "audio" else "audio_id"])
        for rec in comp:
            assert (media / rec[f"input_{m}"]).is_file()
            human, gpt = rec["conversations"]
            assert human["from"] == "human" and gpt["from"] == "gpt"
            assert human["value"].startswith(f"<{m}>\n") and human["value"].count(f"<{m}>") == 1
        for rec in gen:
            assert (media / rec[f"output_{m}"]).is_file()
            assert rec[f"{m}_caption_embeddings"] == rec[f"output_{m}"] + ".npy"
            human, gpt = rec["conversations"]
            assert human["value"].endswith(rec[f"{m}_captions"])
            assert gpt["value"].endswith(f"<{m}>")
        # the three files describe the same samples with the same captions
        caps = [r["caption"] for r in plain]
        assert caps == [r["conversations"][1]["value"] for r in comp] == [r[f"{m}_captions"] for r in gen]


@pytest.mark.real_data
def test_json_keys_match_real_sample(synth: dict[str, Path], sample_root: Path) -> None:
    def key_sets(records: list[dict]) -> set[frozenset]:
        return {frozenset(r) for r in records}

    def turn_keys(records: list[dict]) -> set[frozenset]:
        return {frozenset(t) for r in records for t in r.get("conversations", [])}

    for m, folder in synth.items():
        real = sample_root / REAL[m]
        for suffix in SUFFIXES:
            ours, theirs = load(folder, suffix), load(real, suffix)
            assert key_sets(ours) == key_sets(theirs), (m, suffix)
            assert turn_keys(ours) == turn_keys(theirs), (m, suffix)


def test_vocabulary_covers_all_text(synth: dict[str, Path]) -> None:
    vocab = set(CAPTION_VOCABULARY)
    for folder in synth.values():
        for suffix in SUFFIXES:
            for rec in load(folder, suffix):
                texts = [t["value"] for t in rec.get("conversations", [])] + [rec.get("caption", "")]
                for text in texts:
                    words = re.findall(r"[A-Za-z]+(?:'[A-Za-z]+)?", re.sub(r"<\w+>", "", text))
                    assert set(words) <= vocab, set(words) - vocab


# --------------------------------------------------------------------------- captions are true


def parse_image_caption(caption: str) -> tuple[list[tuple[str, str, str]], str]:
    colours, shapes, places = (
        "|".join(COLOURS),
        "circle|square|triangle",
        "top left|top right|bottom left|bottom right",
    )
    m = re.fullmatch(r"(.+) on a (black|grey) background", caption)
    assert m, caption
    parts = []
    for part in m.group(1).split(" and "):
        pm = re.fullmatch(rf"a ({colours}) ({shapes}) (?:at the ({places})|in the (centre))", part)
        assert pm, part
        parts.append((pm.group(1), pm.group(2), pm.group(3) or pm.group(4)))
    return parts, m.group(2)


def test_image_captions_describe_pixels(synth: dict[str, Path]) -> None:
    from PIL import Image

    folder = synth["image"]
    for rec in load(folder):
        img = np.asarray(Image.open(folder / "images" / rec["image_name"]).convert("RGB")).astype(float)
        assert img.shape == (64, 64, 3)
        shapes, background = parse_image_caption(rec["caption"])
        bg = np.asarray(BACKGROUNDS[background], float)
        assert np.array_equal(img[0, 0], bg) and np.array_equal(img[-1, -1], bg)
        fg = np.any(img != bg, axis=2)
        seen = 0
        for colour, shape, place in shapes:
            cx, cy = POSITIONS[place][1]
            h = SHAPE_HALF + 1  # boxes of neighbouring places do not overlap
            box = fg[cy - h : cy + h + 1, cx - h : cx + h + 1]
            pixels = img[cy - h : cy + h + 1, cx - h : cx + h + 1][box]
            assert len(pixels) > 40, (rec["caption"], place)
            assert nearest_colour(pixels.mean(0)) == colour, rec["caption"]
            ys, xs = np.nonzero(box)  # the shape sits at the captioned place
            assert abs(xs.mean() + cx - h - cx) <= 3 and abs(ys.mean() + cy - h - cy) <= 4
            fill = box.sum() / ((xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1))
            expected = {"square": 1.0, "circle": np.pi / 4, "triangle": 0.5}[shape]
            assert abs(fill - expected) < 0.1, (rec["caption"], fill)
            seen += int(box.sum())
        assert seen == fg.sum(), "no shape is drawn outside the captioned places"


def test_dominant_colour_and_quadrant_of_single_shape_images(synth: dict[str, Path]) -> None:
    """The brief's check, done blind: the main colour and its quadrant read off the pixels alone."""
    from PIL import Image

    folder = synth["image"]
    checked = 0
    for rec in load(folder):
        if " and " in rec["caption"]:
            continue
        img = np.asarray(Image.open(folder / "images" / rec["image_name"]).convert("RGB")).astype(float)
        fg = np.any(img != img[0, 0], axis=2)
        ys, xs = np.nonzero(fg)
        x, y = xs.mean(), ys.mean()
        if abs(x - 32) < 6 and abs(y - 32) < 6:
            place = "in the centre"
        else:
            place = f"at the {'top' if y < 32 else 'bottom'} {'left' if x < 32 else 'right'}"
        words = rec["caption"]
        assert f"a {nearest_colour(img[fg].mean(0))} " in words and place in words, words
        checked += 1
    assert checked > 0


def test_audio_captions_describe_sound(synth: dict[str, Path]) -> None:
    import soundfile as sf

    folder = synth["audio"]
    for rec in load(folder):
        wave, sr = sf.read(folder / "audios" / rec["audio_name"], dtype="float64")
        assert sr == 16_000 and wave.ndim == 1 and 1.0 <= len(wave) / sr <= 3.0
        caption = rec["caption"]
        spectrum = np.abs(np.fft.rfft(wave))
        peak = np.fft.rfftfreq(len(wave), 1 / sr)[int(np.argmax(spectrum))]
        pitch = min(PITCHES, key=lambda p: abs(np.log2(peak / PITCHES[p])))
        loud = "loud" if np.sqrt(np.mean(wave**2)) > 0.12 else "quiet"
        win = sr // 50  # 20 ms frames: beeping leaves many silent ones
        frames = np.sqrt(np.mean(wave[: len(wave) // win * win].reshape(-1, win) ** 2, axis=1))
        pattern = "beeping" if np.mean(frames < 0.1 * frames.max()) > 0.3 else "steady"
        assert caption == f"a {loud} {pitch} pitched {pattern} tone", (caption, peak, loud, pattern)


def test_video_captions_describe_motion(synth: dict[str, Path]) -> None:
    import av

    folder = synth["video"]
    for rec in load(folder):
        with av.open(str(folder / "videos" / rec["video_name"])) as container:
            stream = container.streams.video[0]
            assert stream.codec_context.name == "h264" and (stream.width, stream.height) == (64, 64)
            assert stream.codec_context.pix_fmt == "yuv420p" and stream.average_rate == 8
            frames = [f.to_ndarray(format="rgb24").astype(float) for f in container.decode(video=0)]
        assert len(frames) in (16, 24)

        def centroid(frame: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            bright = frame.max(axis=2) > 80
            ys, xs = np.nonzero(bright)
            return np.array([xs.mean(), ys.mean()]), frame[bright].mean(0)

        (start, colour), (end, _) = centroid(frames[0]), centroid(frames[-1])
        dx, dy = end - start
        if abs(dx) > abs(dy):
            direction = "to the right" if dx > 0 else "to the left"
        else:
            direction = "down" if dy > 0 else "up"
        assert max(abs(dx), abs(dy)) > 30
        assert rec["caption"] == f"a {nearest_colour(colour)} square moving {direction}", (
            rec["caption"],
            dx,
            dy,
        )


# --------------------------------------------------------------------------- determinism, idempotence


def test_deterministic_and_seed_dependent(tmp_path: Path) -> None:
    a = write_synthetic(tmp_path / "a", num_per_modality=6, seed=3)
    b = write_synthetic(tmp_path / "b", num_per_modality=6, seed=3)
    c = write_synthetic(tmp_path / "c", num_per_modality=6, seed=4)
    for m in MODALITIES:
        for suffix in SUFFIXES:
            assert load(a[m], suffix) == load(b[m], suffix)
    img = "images/img_000002.png"
    assert (a["image"] / img).read_bytes() == (b["image"] / img).read_bytes()
    wav = "audios/aud_000001.wav"
    assert (a["audio"] / wav).read_bytes() == (b["audio"] / wav).read_bytes()
    for m in MODALITIES:
        assert [r["caption"] for r in load(a[m])] != [r["caption"] for r in load(c[m])]


def test_idempotent_and_force(tmp_path: Path) -> None:
    first = write_synthetic(tmp_path, num_per_modality=3, seed=0)
    files = sorted(p for f in first.values() for p in f.rglob("*") if p.is_file())
    mtimes = {p: p.stat().st_mtime_ns for p in files}
    second = write_synthetic(tmp_path, num_per_modality=3, seed=0)
    assert second == first
    assert {p: p.stat().st_mtime_ns for p in files} == mtimes
    # no temporary folders are left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"synthetic_{m}" for m in sorted(MODALITIES)]

    old = {p: mtimes[p] - 10**9 for p in files}
    for p, t in old.items():
        os.utime(p, ns=(t, t))
    write_synthetic(tmp_path, num_per_modality=3, seed=0, force=True)
    assert all(p.stat().st_mtime_ns > old[p] for p in files)
    # other parameters regenerate rather than silently reuse
    write_synthetic(tmp_path, num_per_modality=4, seed=0)
    assert len(load(first["video"])) == 4 and len(list((first["video"] / "videos").iterdir())) == 4


def test_incomplete_folder_is_regenerated(tmp_path: Path) -> None:
    folders = write_synthetic(tmp_path, num_per_modality=2, seed=0)
    (folders["audio"] / "audios" / "aud_000001.wav").unlink()
    write_synthetic(tmp_path, num_per_modality=2, seed=0)
    assert (folders["audio"] / "audios" / "aud_000001.wav").is_file()


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--out", str(tmp_path), "--num", "2", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    for m in MODALITIES:
        assert f"synthetic_{m}" in out
        assert len(load(tmp_path / f"synthetic_{m}")) == 2
