"""Synthetic text-X pair data in the exact NExT-GPT on-disk layout.

Why: the project must train and test end to end with nothing from outside, and a tiny model only
learns something if the captions are *true* of the media. So every image, sound and clip here is
drawn from a small attribute grammar (colour, shape, position, pitch, loudness, motion...) and its
caption is rendered from the same attributes.

Layout written for each modality M in (image, audio, video), D = ``synthetic_<M>``::

    out/D/images|audios|videos/<id>.png|.wav|.mp4
    out/D/D.json                 plain pairs, same keys as cc3m.json / audiocap.json / webvid.json
    out/D/D_comprehension.json   X-to-text conversations (LLaVA style, "<image>\\n..." prompts)
    out/D/D_generation.json      text-to-X conversations ("Sure thing! <image>" answers)
    out/D/.synthetic_done        marker with the generation parameters (idempotence)

The ``*_caption_embeddings`` ``.npy`` files named in the generation JSON are not written: the
project computes its own, as for the real data.

Run: ``python -m datamodules.synthetic --out DIR [--num N] [--seed S] [--force]``.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import soundfile as sf
from PIL import Image, ImageDraw
from tqdm import tqdm

from nextgpt.atomic import building, exclusive, install

# Bump when the generator's output changes, so stale folders are regenerated.
GENERATOR_VERSION = 1
MARKER_NAME = ".synthetic_done"
MODALITIES: tuple[str, ...] = ("image", "audio", "video")

# --------------------------------------------------------------------------- attribute grammar

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 200, 40),
    "blue": (40, 70, 235),
    "yellow": (235, 225, 30),
    "purple": (160, 40, 210),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
IMAGE_SIZE = 64
SHAPE_HALF = 8  # shapes fill a 17x17 box; corner and centre boxes never overlap
# position name -> (phrase in caption, centre (x, y) in pixels)
POSITIONS: dict[str, tuple[str, tuple[int, int]]] = {
    "top left": ("at the top left", (14, 14)),
    "top right": ("at the top right", (50, 14)),
    "bottom left": ("at the bottom left", (14, 50)),
    "bottom right": ("at the bottom right", (50, 50)),
    "centre": ("in the centre", (32, 32)),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"black": (0, 0, 0), "grey": (110, 110, 110)}
TWO_SHAPE_PROB = 0.35

SAMPLE_RATE = 16_000
PITCHES: dict[str, float] = {"low": 220.0, "middle": 440.0, "high": 1760.0}
LOUDNESS: dict[str, tuple[float, float]] = {"quiet": (0.04, 0.08), "loud": (0.5, 0.7)}  # peak amplitude
PATTERNS: tuple[str, ...] = ("steady", "beeping")
BEEP_HZ = 4.0  # on/off cycles per second

VIDEO_FPS = 8
VIDEO_BG = (16, 16, 16)
VIDEO_SQUARE = 14  # even, so yuv420p chroma stays aligned
DIRECTIONS: dict[str, str] = {"left": "to the left", "right": "to the right", "up": "up", "down": "down"}

# --------------------------------------------------------------------------- conversation templates
# Same style as the real NExT-GPT files; "{m}" is the modality word.

COMPREHENSION_INSTRUCTIONS: tuple[str, ...] = (
    "Describe this {m}.",
    "Describe the {m} briefly.",
    "What is in the {m}?",
    "What can you see from the {m}?",
    "Give me a short description of the {m}.",
    "Give me a short summary of the {m}.",
    "Generate a caption about {m}.",
    "Tell me about the {m}.",
    "What is the {m} trying to convey?",
    "What's the primary focus of the {m}?",
    "Could you summarize the {m} in one sentence?",
    "What does the {m} show?",
)
# Audio is heard, not seen: keep its instructions truthful too.
AUDIO_COMPREHENSION_INSTRUCTIONS: tuple[str, ...] = (
    "Describe this audio.",
    "Describe the audio briefly.",
    "What is in the audio?",
    "What can you hear in the audio?",
    "Give me a short description of the audio.",
    "Give me a short summary of the audio.",
    "Generate a caption about audio.",
    "Tell me about the audio.",
    "What is the audio trying to convey?",
    "What is the main idea of the audio?",
    "Could you summarize the audio in one sentence?",
    "What sound do you hear in the audio?",
)
GENERATION_NOUNS: dict[str, tuple[str, ...]] = {
    "image": ("image", "picture", "drawing", "illustration", "painting", "snapshot"),
    "audio": ("audio", "sound", "tune", "recording", "audio clip", "soundtrack"),
    "video": ("video", "clip", "movie", "video clip", "film", "animation"),
}
GENERATION_REQUESTS: tuple[str, ...] = (
    "Can you generate me a {n} of {c}",
    "Could you show me a {n} of {c}",
    "Please create a {n} of {c}",
    "I'd like you to produce a {n} of {c}",
    "I want you to make a {n} of {c}",
    "make me a {n} of {c}",
    "generate a {n} where {c}",
    "render a {n} from {c}",
)
GENERATION_ANSWERS: tuple[str, ...] = (
    "Sure thing! <{m}>",
    "Sure. <{m}>",
    "Of course! <{m}>",
    "Certainly! <{m}>",
    "No problem. <{m}>",
    "Here is a {m} for your reference <{m}>",
    "Sure, this is the {m} you want. <{m}>",
)

MEDIA_DIRS: dict[str, str] = {"image": "images", "audio": "audios", "video": "videos"}
EXTENSIONS: dict[str, str] = {"image": ".png", "audio": ".wav", "video": ".mp4"}
ID_PREFIXES: dict[str, str] = {"image": "img", "audio": "aud", "video": "vid"}
# Plain-pair id key, as in the real files: cc3m/webvid use "id", audiocap uses "audio_id".
ID_KEYS: dict[str, str] = {"image": "id", "audio": "audio_id", "video": "id"}


def dataset_name(modality: str) -> str:
    """Folder (and JSON stem) of one modality's data set."""
    return f"synthetic_{modality}"


# --------------------------------------------------------------------------- caption renderers


def image_caption(shapes: list[tuple[str, str, str]], background: str) -> str:
    """Caption for (colour, shape, position) triples on a background."""
    parts = [f"a {c} {s} {POSITIONS[p][0]}" for c, s, p in shapes]
    return f"{' and '.join(parts)} on a {background} background"


def audio_caption(loudness: str, pitch: str, pattern: str) -> str:
    """Caption for a tone, e.g. 'a loud high pitched beeping tone'."""
    return f"a {loudness} {pitch} pitched {pattern} tone"


def video_caption(colour: str, direction: str) -> str:
    """Caption for a moving square, e.g. 'a green square moving to the right'."""
    return f"a {colour} square moving {DIRECTIONS[direction]}"


def _vocabulary() -> list[str]:
    """Every word that can appear in a caption, instruction, request or answer.

    Why: a tokenizer trained elsewhere on this list never meets an unknown word on this data.
    Words keep their case; the ``<image>``-style placeholders are not words and are left out.
    """
    texts: list[str] = []
    texts += [
        image_caption([(c, s, p)], b) for c in COLOURS for s in SHAPES for p in POSITIONS for b in BACKGROUNDS
    ]
    texts.append(image_caption([("red", "circle", "top left"), ("red", "circle", "top right")], "black"))
    texts += [audio_caption(loud, p, t) for loud in LOUDNESS for p in PITCHES for t in PATTERNS]
    texts += [video_caption(c, d) for c in COLOURS for d in DIRECTIONS]
    for m in MODALITIES:
        instr = AUDIO_COMPREHENSION_INSTRUCTIONS if m == "audio" else COMPREHENSION_INSTRUCTIONS
        texts += [i.format(m=m) for i in instr]
        texts += [r.format(n=n, c="") for r in GENERATION_REQUESTS for n in GENERATION_NOUNS[m]]
        texts += [a.format(m=m).replace(f"<{m}>", "") for a in GENERATION_ANSWERS]
    words = {w for t in texts for w in re.findall(r"[A-Za-z]+(?:'[A-Za-z]+)?", t)}
    return sorted(words)


CAPTION_VOCABULARY: list[str] = _vocabulary()

# --------------------------------------------------------------------------- media writers


@dataclass(frozen=True)
class Item:
    """One generated sample: its id, media file name and caption."""

    id: str
    file_name: str
    caption: str


def _item_rng(seed: int, modality: str, index: int) -> np.random.Generator:
    """One generator per item: item i is the same whatever num_per_modality is."""
    return np.random.default_rng([seed, MODALITIES.index(modality), index])


def _pick(rng: np.random.Generator, options: Any) -> Any:
    seq = list(options)
    return seq[int(rng.integers(len(seq)))]


def _make_image(rng: np.random.Generator, path: Path) -> str:
    """Draw one or two flat shapes (no anti-aliasing, so colours stay exact) and caption them."""
    background = _pick(rng, BACKGROUNDS)
    n_shapes = 2 if rng.random() < TWO_SHAPE_PROB else 1
    positions = [list(POSITIONS)[i] for i in rng.permutation(len(POSITIONS))[:n_shapes]]
    shapes = [(_pick(rng, COLOURS), _pick(rng, SHAPES), p) for p in positions]
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUNDS[background])
    draw = ImageDraw.Draw(img)
    h = SHAPE_HALF
    for colour, shape, pos in shapes:
        x, y = POSITIONS[pos][1]
        fill = COLOURS[colour]
        if shape == "circle":
            draw.ellipse([x - h, y - h, x + h, y + h], fill=fill)
        elif shape == "square":
            draw.rectangle([x - h, y - h, x + h, y + h], fill=fill)
        else:
            draw.polygon([(x, y - h), (x + h, y + h), (x - h, y + h)], fill=fill)
    img.save(path, format="PNG", optimize=False)
    return image_caption(shapes, background)


def _make_audio(rng: np.random.Generator, path: Path) -> str:
    """Synthesize a sine tone (steady or 4 Hz beeping) and caption pitch, loudness, pattern."""
    pitch = _pick(rng, PITCHES)
    loudness = _pick(rng, LOUDNESS)
    pattern = _pick(rng, PATTERNS)
    duration = round(float(rng.uniform(1.0, 3.0)) * 4) / 4  # 1.0 .. 3.0 s in quarter seconds
    freq = PITCHES[pitch] * 2.0 ** float(rng.uniform(-0.15, 0.15))  # stays well inside its class
    amp = float(rng.uniform(*LOUDNESS[loudness]))
    t = np.arange(int(round(duration * SAMPLE_RATE))) / SAMPLE_RATE
    wave = amp * np.sin(2 * np.pi * freq * t + float(rng.uniform(0, 2 * np.pi)))
    if pattern == "beeping":
        wave *= (np.floor(t * BEEP_HZ * 2) % 2 == 0).astype(np.float64)  # on half, off half
    # 5 ms ramps at the ends and at every beep edge, so there are no clicks
    env = np.ones_like(t)
    ramp = int(0.005 * SAMPLE_RATE)
    env[:ramp] = np.linspace(0, 1, ramp)
    env[-ramp:] = np.linspace(1, 0, ramp)
    if pattern == "beeping":
        phase = (t * BEEP_HZ * 2) % 1.0 * (SAMPLE_RATE / (BEEP_HZ * 2))  # samples into the half period
        half = SAMPLE_RATE / (BEEP_HZ * 2)
        env *= np.clip(np.minimum(phase, half - phase) / ramp, 0, 1)
    sf.write(str(path), (wave * env).astype(np.float32), SAMPLE_RATE, subtype="PCM_16", format="WAV")
    return audio_caption(loudness, pitch, pattern)


def _make_video(rng: np.random.Generator, path: Path) -> str:
    """Encode a coloured square crossing a dark frame (H.264, yuv420p, 8 fps) and caption it."""
    import av  # deferred: PyAV (FFmpeg) costs ~0.1 s to import; only writing a video needs it

    colour = _pick(rng, COLOURS)
    direction = _pick(rng, DIRECTIONS)
    n_frames = int(rng.integers(2, 4)) * VIDEO_FPS  # 2 or 3 s
    s, size = VIDEO_SQUARE, IMAGE_SIZE
    lo, hi = 2, size - 2 - s  # travel range of the square's top-left corner
    across = 2 * int(rng.integers(4, (size - s - 8) // 2 + 1))  # even, fixed coordinate
    travel = np.linspace(lo, hi, n_frames)
    if direction in ("left", "up"):
        travel = travel[::-1]
    container = av.open(str(path), mode="w", format="mp4")
    try:
        stream = container.add_stream("libx264", rate=Fraction(VIDEO_FPS, 1))
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18", "preset": "veryfast", "threads": "1"}
        for k in range(n_frames):
            frame = np.empty((size, size, 3), dtype=np.uint8)
            frame[:] = VIDEO_BG
            pos = 2 * int(round(travel[k] / 2))
            x, y = (pos, across) if direction in ("left", "right") else (across, pos)
            frame[y : y + s, x : x + s] = COLOURS[colour]
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    finally:
        container.close()
    return video_caption(colour, direction)


MAKERS: dict[str, Callable[[np.random.Generator, Path], str]] = {
    "image": _make_image,
    "audio": _make_audio,
    "video": _make_video,
}

# --------------------------------------------------------------------------- JSON records


def _records(modality: str, items: list[Item], seed: int) -> dict[str, list[dict[str, Any]]]:
    """The three JSON lists, keys and key order mirroring the real NExT-GPT files."""
    m = modality
    plain, comp, gen = [], [], []
    instructions = AUDIO_COMPREHENSION_INSTRUCTIONS if m == "audio" else COMPREHENSION_INSTRUCTIONS
    # templates are drawn from their own stream, so media attributes do not depend on them
    rng = np.random.default_rng([seed, MODALITIES.index(m), 1_000_003])
    for it in items:
        if m == "audio":
            plain.append({ID_KEYS[m]: it.id, f"{m}_name": it.file_name, "caption": it.caption})
        else:
            plain.append({"caption": it.caption, ID_KEYS[m]: it.id, f"{m}_name": it.file_name})
        comp.append(
            {
                f"input_{m}": it.file_name,
                "conversations": [
                    {"from": "human", "value": f"<{m}>\n" + _pick(rng, instructions).format(m=m)},
                    {"from": "gpt", "value": it.caption},
                ],
            }
        )
        request = _pick(rng, GENERATION_REQUESTS).format(n=_pick(rng, GENERATION_NOUNS[m]), c=it.caption)
        gen.append(
            {
                f"output_{m}": it.file_name,
                f"{m}_captions": it.caption,
                f"{m}_caption_embeddings": f"{it.file_name}.npy",
                "conversations": [
                    {"from": "human", "value": request},
                    {"from": "gpt", "value": _pick(rng, GENERATION_ANSWERS).format(m=m)},
                ],
            }
        )
    d = dataset_name(m)
    return {f"{d}.json": plain, f"{d}_comprehension.json": comp, f"{d}_generation.json": gen}


# --------------------------------------------------------------------------- folder management


class MarkerParams(TypedDict):
    """What a folder's marker records: the parameters its data set was written with."""

    modality: str
    num_per_modality: int
    seed: int
    version: int


def _params(modality: str, num: int, seed: int) -> MarkerParams:
    return {"modality": modality, "num_per_modality": num, "seed": seed, "version": GENERATOR_VERSION}


def _is_complete(folder: Path, params: MarkerParams) -> bool:
    """True when the folder carries our marker with these exact parameters and all its files."""
    marker = folder / MARKER_NAME
    try:
        if json.loads(marker.read_text()) != params:
            return False
    except (OSError, ValueError):
        return False
    m, d = params["modality"], folder.name
    media = folder / MEDIA_DIRS[m]
    n_media = sum(1 for p in media.iterdir() if p.suffix == EXTENSIONS[m]) if media.is_dir() else -1
    jsons = all((folder / f"{d}{s}.json").is_file() for s in ("", "_comprehension", "_generation"))
    return jsons and n_media == params["num_per_modality"]


def _build(modality: str, folder: Path, num: int, seed: int) -> None:
    """Write one modality's complete data set into an empty folder (marker last)."""
    media = folder / MEDIA_DIRS[modality]
    media.mkdir(parents=True)
    items: list[Item] = []
    prefix, ext = ID_PREFIXES[modality], EXTENSIONS[modality]
    for i in tqdm(range(num), desc=f"synthetic {modality}", unit="file", leave=False):
        item_id = f"{prefix}_{i:06d}"
        caption = MAKERS[modality](_item_rng(seed, modality, i), media / f"{item_id}{ext}")
        items.append(Item(item_id, f"{item_id}{ext}", caption))
    for name, records in _records(modality, items, seed).items():
        (folder / name).write_text(json.dumps(records, indent=4, ensure_ascii=False) + "\n")
    (folder / MARKER_NAME).write_text(json.dumps(_params(modality, num, seed)))


def write_synthetic(
    out: Path,
    *,
    num_per_modality: int = 24,
    seed: int = 0,
    force: bool = False,
    modalities: Sequence[str] = MODALITIES,
) -> dict[str, Path]:
    """Write the synthetic data sets under ``out`` (all three, or only ``modalities``) and return their folders.

    Idempotent: a modality whose folder already carries a marker with the same parameters is left
    untouched (unless ``force``). Each folder is built in a temporary directory beside it and
    renamed into place, so readers never see a half-written data set.
    """
    if num_per_modality < 1:
        raise ValueError(f"num_per_modality must be >= 1, got {num_per_modality}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    unknown = sorted(set(modalities) - set(MODALITIES))
    if unknown:
        raise ValueError(f"no synthetic data for modalities {unknown}; the world has {list(MODALITIES)}")
    folders = {m: out / dataset_name(m) for m in modalities}
    for m, dest in folders.items():
        params = _params(m, num_per_modality, seed)
        if not force and _is_complete(dest, params):
            continue
        with exclusive(dest):  # a concurrent writer on this machine goes first; its result is then kept
            if not force and _is_complete(dest, params):
                continue
            with building(dest) as tmp:
                _build(m, tmp, num_per_modality, seed)
                install(tmp, dest, complete=functools.partial(_is_complete, params=params), force=force)
    return folders


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    """CLI: generate the synthetic data sets and print where they are and how big."""
    parser = argparse.ArgumentParser(
        prog="python -m datamodules.synthetic", description="Write the synthetic NExT-GPT text-X pair data."
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="folder that receives synthetic_{image,audio,video}"
    )
    parser.add_argument("--num", type=int, default=24, help="samples per modality (default 24)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--force", action="store_true", help="rewrite even if complete")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    folders = write_synthetic(args.out, num_per_modality=args.num, seed=args.seed, force=args.force)
    elapsed = time.perf_counter() - t0
    for m, folder in folders.items():
        records = json.loads((folder / f"{folder.name}.json").read_text())
        print(f"{m:5s}  {len(records):5d} samples  {_folder_bytes(folder) / 1024:8.1f} KiB  {folder}")
        print(f"       e.g. {records[0]['caption']!r}")
    print(f"done in {elapsed:.2f} s (seed {args.seed})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
