"""What the evaluation modules share about samples and their records: the prompt of a sample, its
file stem, batching, where a record's generated media lie, and what predictions= can not measure."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from pathlib import Path

from omegaconf import DictConfig

NO_MODEL = "predictions= scores given outputs without a model; {what} is measured only when evaluate.py runs the model"


def file_stem(sample_id: str) -> str:
    """A sample id as a file name (ids are COCO numbers, YouTube ids, ``video7010``)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", str(sample_id))


def batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def task_prompt(task: DictConfig, sample) -> str:
    """The task's request with the sample's caption put in as a phrase ("A dog runs." -> "a dog runs")."""
    caption = sample.caption.strip().rstrip(".")
    if caption[:1].isupper() and not caption[1:2].isupper():
        caption = caption[0].lower() + caption[1:]
    return str(task.prompt).format(caption=caption)


def media_file(rec: dict, name: str, out: Path) -> Path | None:
    files = (rec.get("files") or {}).get(name) or []
    if not files:
        return None
    p = Path(files[0])
    return p if p.is_absolute() else out / p
