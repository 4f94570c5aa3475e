"""A contact sheet: one PNG that shows what a generation run made, a row per prompt.

Each row holds the prompt (and the model's answer) on the left and, for every generated file, a
picture of it: an image scaled up (nearest neighbour, so pixels stay pixels), the log-magnitude
spectrogram of an audio clip (time left to right, frequency bottom to top), the frames of a video
side by side. Read from the ``generations.json`` that ``python -m nextgpt.generate`` writes.

    python -m nextgpt.contact_sheet outputs/demo [--out outputs/demo/contact_sheet.png]
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from nextgpt.world.analysers import read_audio, read_image, read_video

TILE = 128  # the height of every picture in a row
TEXT_WIDTH = 300
PAD = 8
BACKGROUND = (24, 24, 24)
INK = (235, 235, 235)


def image_tile(path: str | Path) -> np.ndarray:

    return _scaled(read_image(path), TILE)


def _resized(rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    return np.asarray(
        Image.fromarray(np.asarray(rgb, np.uint8)).resize((width, height), Image.Resampling.NEAREST)
    )


def _scaled(rgb: np.ndarray, height: int) -> np.ndarray:
    h, w = rgb.shape[:2]
    return _resized(rgb, max(1, round(w * height / h)), height)


def spectrogram(wave: np.ndarray, rate: int, *, n_fft: int = 256, height: int = TILE) -> np.ndarray:
    """(height, frames, 3) grey log-magnitude spectrogram, low frequencies at the bottom, 60 dB of range."""
    x = (
        np.asarray(wave, np.float64).reshape(-1)
        if np.ndim(wave) == 1
        else np.asarray(wave, np.float64).mean(-1)
    )
    hop = n_fft // 4
    x = np.pad(x, (0, max(0, n_fft - len(x))))
    count = 1 + (len(x) - n_fft) // hop
    frames = np.stack([x[i * hop : i * hop + n_fft] * np.hanning(n_fft) for i in range(count)])
    mag = 20 * np.log10(np.abs(np.fft.rfft(frames, axis=1)).T + 1e-6)  # (freq, time)
    level = np.clip((mag - (mag.max() - 60.0)) / 60.0, 0.0, 1.0)[::-1]
    grey = np.repeat((level * 255).astype(np.uint8)[..., None], 3, axis=-1)
    return _resized(grey, max(grey.shape[1], height), height)  # at least square: a short clip stays readable


def audio_tile(path: str | Path) -> np.ndarray:

    wave, rate = read_audio(path)
    return spectrogram(wave, rate)


def video_tile(path: str | Path, frames: int = 8) -> np.ndarray:
    """Up to ``frames`` frames, evenly spread, side by side."""

    clip = read_video(path)
    picks = np.linspace(0, len(clip) - 1, min(frames, len(clip))).round().astype(int)
    size = TILE // 2
    strip = [_scaled(clip[i], size) for i in picks]
    gap = np.full((size, 2, 3), 80, np.uint8)
    return np.concatenate([part for f in strip for part in (f, gap)][:-1], axis=1)


TILES = {"image": image_tile, "audio": audio_tile, "video": video_tile}


def _text_block(lines: list[str], height: int) -> np.ndarray:
    canvas = Image.new("RGB", (TEXT_WIDTH, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    y = 2
    for line in lines:
        for part in textwrap.wrap(line, width=44) or [""]:
            draw.text((2, y), part, fill=INK)
            y += 12
    return np.asarray(canvas)


def rows_of(generations: list[dict], root: Path) -> list[tuple[list[str], list[np.ndarray]]]:
    """(text lines, tiles) per generation entry; a file that can not be read becomes a line saying so."""
    rows = []
    for entry in generations:
        lines, tiles = [f"> {entry.get('prompt', '')}", f"< {entry.get('answer', '')}"], []
        for modality, files in (entry.get("files") or {}).items():
            for f in files:
                path = Path(f) if Path(f).is_absolute() or Path(f).exists() else root / Path(f).name
                try:
                    tiles.append(TILES[modality](path))
                except KeyError:
                    lines.append(f"({modality}: no picture for this modality)")
                except (OSError, ValueError) as e:
                    lines.append(f"({modality} {Path(f).name}: unreadable: {e})")
        rows.append((lines, tiles))
    return rows


def contact_sheet(generations: list[dict], root: Path) -> np.ndarray:
    """(H, W, 3) uint8: the sheet of ``generations`` (files relative to the working folder or ``root``)."""
    rows = rows_of(generations, root)
    if not rows:
        raise ValueError("no generations to draw")
    width = TEXT_WIDTH + PAD + max([sum(t.shape[1] + PAD for t in tiles) for _, tiles in rows] + [TILE])
    out = []
    for lines, tiles in rows:
        row = np.zeros((TILE, width, 3), np.uint8)
        row[:] = BACKGROUND
        row[:, :TEXT_WIDTH] = _text_block(lines, TILE)
        x = TEXT_WIDTH + PAD
        for tile in tiles:
            row[: tile.shape[0], x : x + tile.shape[1]] = tile[:TILE]
            x += tile.shape[1] + PAD
        out += [row, np.full((PAD, width, 3), 60, np.uint8)]
    return np.concatenate(out[:-1])


def write_contact_sheet(folder: str | Path, out: str | Path | None = None) -> Path:
    """Draw ``folder/generations.json`` into ``out`` (default ``folder/contact_sheet.png``)."""
    folder = Path(folder)
    index = folder / "generations.json"
    if not index.is_file():
        raise FileNotFoundError(
            f"{index} does not exist (write it with python -m nextgpt.generate --out {folder})"
        )
    out = Path(out) if out else folder / "contact_sheet.png"
    Image.fromarray(contact_sheet(json.loads(index.read_text()), folder)).save(out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m nextgpt.contact_sheet", description=__doc__.split("\n\n")[0])
    p.add_argument("folder", help="a generation output folder (holding generations.json)")
    p.add_argument("--out", help="the PNG to write (default: FOLDER/contact_sheet.png)")
    args = p.parse_args(argv)
    try:
        print(f"contact sheet: {write_contact_sheet(args.folder, args.out)}")
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
