"""The contact sheet draws what a generation run made: the image's own pixels, a tone's spectrogram
bright at its pitch, a video's frames in order; an unreadable file is named, not fatal."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from nextgpt.contact_sheet import PAD, TEXT_WIDTH, TILE, main, rows_of, spectrogram, write_contact_sheet


def write_video(path, frames):
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for f in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        container.mux(stream.encode())


@pytest.fixture
def run(tmp_path):
    image = np.zeros((32, 32, 3), np.uint8)
    image[2:10, 2:10] = (220, 30, 30)  # a red square at the top left
    Image.fromarray(image).save(tmp_path / "image_0.png")
    t = np.arange(8000) / 16000
    sf.write(tmp_path / "audio_0.wav", 0.5 * np.sin(2 * np.pi * 4000 * t), 16000)
    frames = np.zeros((8, 32, 32, 3), np.uint8)
    for i in range(8):
        frames[i, 12:20, 2 + 3 * i : 10 + 3 * i] = (30, 200, 40)  # a green square moving to the right
    write_video(tmp_path / "video_0.mp4", frames)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    gens = [
        {"prompt": "an image", "answer": "<image>", "files": {"image": [str(tmp_path / "image_0.png")]}},
        {"prompt": "a tone", "answer": "<audio>", "files": {"audio": [str(tmp_path / "audio_0.wav")]}},
        {"prompt": "a clip", "answer": "<video>", "files": {"video": [str(tmp_path / "video_0.mp4")]}},
        {"prompt": "broken", "answer": "<image>", "files": {"image": [str(tmp_path / "broken.png")]}},
    ]
    (tmp_path / "generations.json").write_text(json.dumps(gens))
    return tmp_path, image


def test_each_row_shows_its_media(run):
    folder, image = run
    sheet = np.asarray(Image.open(write_contact_sheet(folder)))
    assert sheet.shape[0] == 4 * TILE + 3 * PAD
    x = TEXT_WIDTH + PAD
    scale = TILE // 32
    np.testing.assert_array_equal(
        sheet[:TILE, x : x + TILE], np.kron(image, np.ones((scale, scale, 1), np.uint8))
    )
    video = sheet[2 * (TILE + PAD) : 2 * (TILE + PAD) + TILE // 2, x:]
    green = (video[..., 1].astype(int) - video[..., 0] > 100) & (video[..., 1] > 120)
    cols = [
        np.nonzero(green[:, i * (TILE // 2 + 2) : i * (TILE // 2 + 2) + TILE // 2].any(0))[0].mean()
        for i in range(8)
    ]
    assert all(b > a for a, b in itertools.pairwise(cols))  # the square moves right, frame after frame


def test_a_tone_is_bright_at_its_frequency():
    t = np.arange(16000) / 16000
    spec = spectrogram(0.5 * np.sin(2 * np.pi * 2000 * t), 16000)[..., 0]
    row = int(spec.mean(1).argmax())
    assert abs((1 - row / TILE) * 8000 - 2000) < 8000 / TILE * 2  # 2 kHz of 8 kHz, from the bottom


def test_unreadable_files_and_missing_runs(run, tmp_path, capsys):
    folder, _ = run
    assert (
        main([str(folder), "--out", str(tmp_path / "sheet.png")]) == 0 and (tmp_path / "sheet.png").is_file()
    )
    lines, tiles = rows_of(json.loads((folder / "generations.json").read_text()), folder)[3]
    assert tiles == [] and any("broken.png: unreadable" in line for line in lines)
    assert main([str(tmp_path / "nothing")]) == 2
    assert "nothing/generations.json does not exist" in capsys.readouterr().err
