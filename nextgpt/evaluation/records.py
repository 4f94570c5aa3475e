"""What the evaluation modules share about samples and their records: the prompt of a sample, its
file stem, batching, where a record's generated media lie, what predictions= can not measure, and
the shapes of what a run writes (a record of ``samples.jsonl``, ``run.json``, ``per_sample.json``,
``results.json``)."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Required, TypedDict

from nextgpt.evaluation.spec import TaskSpec

NO_MODEL = "predictions= scores given outputs without a model; {what} is measured only when evaluate.py runs the model"


class Record(TypedDict, total=False):
    """One sample's answer, a line of ``samples.jsonl`` (or one given output of predictions=):
    ``error`` instead of the answer when the sample could not be answered."""

    id: Required[str]
    prompt: str
    text: str
    caption: str  # the text without its media placeholders
    signal_groups: list[str]
    files: dict[str, list[str]]  # modality -> generated files (relative to the run folder, or absolute)
    notes: list[str]
    new_tokens: int
    seconds: float
    error: str


class RunSettings(TypedDict):
    """What a run folder's outputs depend on (``run.json``): a resumed run must not mix two settings."""

    task: str
    checkpoint: str | None
    prompt: str
    generation: dict[str, Any]
    seed: int
    benchmark: dict[str, Any]


class PerSample(TypedDict, total=False):
    """``per_sample.json``: a metric's score of each sample (sample id -> score)."""

    clip_score: dict[str, float]
    clap_score: dict[str, float]
    clipsim: dict[str, float]
    clipsim_frames: dict[str, list[float]]  # each frame's CLIP score
    world_attributes: dict[str, dict[str, Any]]  # the attributes each answer states


class BenchmarkResult(TypedDict):
    """``results.json`` of a benchmark task."""

    task: str
    kind: str
    modality: str
    benchmark: str
    checkpoint: str | None
    predictions: str | None
    samples: int
    answered: int
    limit: int | None
    metrics: dict[str, dict[str, Any]]  # metric -> its entry (nextgpt.metrics.value)
    paper: dict[str, Any]


def file_stem(sample_id: str) -> str:
    """A sample id as a file name (ids are COCO numbers, YouTube ids, ``video7010``)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", str(sample_id))


def batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def task_prompt(task: TaskSpec, sample) -> str:
    """The task's request with the sample's caption put in as a phrase ("A dog runs." -> "a dog runs")."""
    caption = sample.caption.strip().rstrip(".")
    if caption[:1].isupper() and not caption[1:2].isupper():
        caption = caption[0].lower() + caption[1:]
    return task.prompt.format(caption=caption)


def media_file(rec: Record, name: str, out: Path) -> Path | None:
    files = (rec.get("files") or {}).get(name) or []
    if not files:
        return None
    p = Path(files[0])
    return p if p.is_absolute() else out / p
