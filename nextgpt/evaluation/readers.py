"""Readers for the evaluation benchmarks, each in the layout of its official release.

| reader | annotation file (under the benchmark root) | media |
|---|---|---|
| ``coco`` | ``annotations/captions_val2014.json`` or Karpathy's ``dataset_coco.json``| ``val2014/<file_name>`` |
| ``audiocaps`` | ``test.csv`` (audiocap_id,youtube_id,start_time,caption) | ``audio/test/<youtube_id>.wav`` |
| ``msrvtt`` | ``test_videodatainfo.json`` or ``MSRVTT_data.json`` (videos + sentences) | ``TestVideo/<video_id>.mp4`` |

A reader returns ``Sample``s: one per image / clip / video, with every reference caption. The
sample id is the benchmark's own (COCO image id, YouTube id, ``video7010``), as a string; it
keys predictions files and generated media.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class BenchmarkError(ValueError):
    """A benchmark folder or annotation file that can not be read: the message names the path."""


@dataclass
class Sample:
    id: str
    modality: str  # of the benchmark's media: "image", "audio", "video"
    media: Path | None  # the real file, None when it is not on disk
    captions: list[str] = field(default_factory=list)  # every reference caption, in file order

    @property
    def caption(self) -> str:
        """The caption used as the generation prompt (the first one)."""
        return self.captions[0]


def _load_json(path: Path) -> Any:
    if not path.is_file():
        raise BenchmarkError(f"annotation file not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise BenchmarkError(f"{path}: not valid JSON ({e})") from None


def _existing(path: Path) -> Path | None:
    return path if path.is_file() else None


# --- COCO captions ------------------------------------------------------------------------------
def read_coco(
    root: str | Path,
    annotations: str = "annotations/captions_val2014.json",
    media_dir: str = "val2014",
    split: str | None = None,
) -> list[Sample]:
    """COCO captions (``{"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}``),
    or Karpathy's ``dataset_coco.json`` (``{"images": [{"cocoid", "filepath", "filename", "split",
    "sentences": [{"raw"}]}]}``), where ``split`` picks ``test``/``val``/``train``."""
    root = Path(root)
    path = root / annotations
    data = _load_json(path)
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise BenchmarkError(
            f"{path}: no 'images' list (expected COCO captions or Karpathy dataset_coco.json)"
        )
    samples = []
    if images and "sentences" in images[0]:  # Karpathy split file
        for im in images:
            if split and im.get("split") != split:
                continue
            media = (
                root / media_dir / im["filename"]
                if media_dir
                else root / im.get("filepath", "") / im["filename"]
            )
            samples.append(
                Sample(
                    str(im.get("cocoid", im.get("imgid"))),
                    "image",
                    _existing(media),
                    [s["raw"].strip() for s in im["sentences"]],
                )
            )
        return samples
    anns = data.get("annotations")
    if not isinstance(anns, list):
        raise BenchmarkError(f"{path}: no 'annotations' list")
    captions: dict[str, list[str]] = {}
    for a in sorted(anns, key=lambda a: a.get("id", 0)):
        captions.setdefault(str(a["image_id"]), []).append(str(a["caption"]).strip())
    for im in images:
        sid = str(im["id"])
        if sid in captions:
            samples.append(Sample(sid, "image", _existing(root / media_dir / im["file_name"]), captions[sid]))
    return samples


# --- AudioCaps ----------------------------------------------------------------------------------
AUDIOCAPS_COLUMNS = ("audiocap_id", "youtube_id", "start_time", "caption")


def read_audiocaps(
    root: str | Path,
    annotations: str = "test.csv",
    media_dir: str = "audio/test",
    file_patterns: Sequence[str] = (
        "{youtube_id}.wav",
        "Y{youtube_id}.wav",
        "{youtube_id}_{start_time}.wav",
        "{audiocap_id}.wav",
    ),
    split: str | None = None,
) -> list[Sample]:
    """AudioCaps csv (one row per caption; the test set has five per clip), grouped by YouTube id.
    The clips are not distributed with the captions: the first of ``file_patterns`` that exists
    under ``media_dir`` is the clip."""
    root = Path(root)
    path = root / annotations
    if not path.is_file():
        raise BenchmarkError(f"annotation file not found: {path}")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in AUDIOCAPS_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise BenchmarkError(
                f"{path}: columns {missing} missing; AudioCaps csv has {list(AUDIOCAPS_COLUMNS)}"
            )
        rows = sorted(reader, key=lambda r: int(r["audiocap_id"]))
    by_clip: dict[str, list[dict]] = {}
    for r in rows:
        by_clip.setdefault(r["youtube_id"], []).append(r)
    samples = []
    for yid, clip_rows in by_clip.items():
        first = clip_rows[0]
        media = None
        for pattern in file_patterns:
            candidate = root / media_dir / pattern.format(**first)
            if candidate.is_file():
                media = candidate
                break
        samples.append(Sample(yid, "audio", media, [r["caption"].strip() for r in clip_rows]))
    return samples


# --- MSR-VTT ------------------------------------------------------------------------------------
def read_msrvtt(
    root: str | Path,
    annotations: str = "test_videodatainfo.json",
    media_dir: str = "TestVideo",
    split: str | None = "test",
    extension: str = ".mp4",
) -> list[Sample]:
    """MSR-VTT's ``{"videos": [{"video_id", "split"}], "sentences": [{"video_id", "caption", "sen_id"}]}``
    (``test_videodatainfo.json``, ``train_val_videodatainfo.json`` or the all-in-one
    ``MSRVTT_data.json``); ``split`` keeps the videos of that split where the file records one."""
    root = Path(root)
    path = root / annotations
    data = _load_json(path)
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("videos"), list)
        or not isinstance(data.get("sentences"), list)
    ):
        raise BenchmarkError(f"{path}: expected MSR-VTT's {{'videos': [...], 'sentences': [...]}}")
    captions: dict[str, list[str]] = {}
    for s in sorted(data["sentences"], key=lambda s: s.get("sen_id", 0)):
        captions.setdefault(s["video_id"], []).append(str(s["caption"]).strip())
    samples = []
    for v in data["videos"]:
        if split and v.get("split", split) != split:
            continue
        vid = v["video_id"]
        if vid in captions:
            samples.append(
                Sample(vid, "video", _existing(root / media_dir / f"{vid}{extension}"), captions[vid])
            )
    return samples


# --- the toy world ----------------------------------------------------------------------------------
def read_world(root: str | Path, modality: str, seed: int = 1000, num: int = 160) -> list[Sample]:
    """Held-out items of the toy world (``nextgpt.world``): ``num`` items per modality drawn with a
    ``seed`` no training set uses, written under ``root`` on first use (deterministic). Images of
    two shapes are left out: the score reads one shape's attributes, and which one an answer names
    first is not an error of the model."""
    from nextgpt.world.synthetic import (  # deferred: the real-weights path never imports nextgpt.world
        MEDIA_DIRS,
        dataset_name,
        write_synthetic,
    )

    if modality not in MEDIA_DIRS:
        raise BenchmarkError(f"the world has no {modality!r} items; it has {sorted(MEDIA_DIRS)}")
    write_synthetic(Path(root), num_per_modality=int(num), seed=int(seed))
    folder = Path(root) / dataset_name(modality)
    entries = _load_json(folder / f"{dataset_name(modality)}.json")
    out = []
    for e in entries:
        caption = e["caption"]
        if modality == "image" and " and a " in caption:
            continue
        key = str(e.get("id", e.get("audio_id")))
        out.append(
            Sample(key, modality, _existing(folder / MEDIA_DIRS[modality] / e[f"{modality}_name"]), [caption])
        )
    return out


read_world.writes_root = True  # type: ignore[attr-defined]  # the reader makes its benchmark folder


READERS: dict[str, Callable[..., list[Sample]]] = {
    "coco": read_coco,
    "audiocaps": read_audiocaps,
    "msrvtt": read_msrvtt,
    "world": read_world,
}


def read_benchmark(reader: str, root: str | Path, **options: Any) -> list[Sample]:
    if reader not in READERS:
        raise BenchmarkError(f"unknown benchmark reader {reader!r}; known: {sorted(READERS)}")
    if not Path(root).is_dir() and not getattr(READERS[reader], "writes_root", False):
        raise BenchmarkError(f"benchmark folder not found: {root}")
    samples = READERS[reader](root, **options)
    if not samples:
        raise BenchmarkError(f"{root}: the annotations list no sample (reader {reader}, options {options})")
    return samples
