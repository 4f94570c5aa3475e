"""`python evaluate.py task=world_*`: the toy world's scorecard from the user's side. Given outputs
(`predictions=`) that state the truth score 1.0, outputs that state something else score near 0,
and the report puts each attribute beside chance."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from nextgpt.world.synthetic import MEDIA_DIRS
from tests.cli import ENV, run_python
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow
SMALL = ["task.benchmark.options.num=30"]


def evaluate(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "eval"
    res = run_python(
        [
            sys.executable,
            "evaluate.py",
            *args,
            *SMALL,
            f"paths.cache_dir={tmp_path / 'cache'}",
            f"hydra.run.dir={out}",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **ENV},
    )
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    return json.loads((out / "results.json").read_text())["metrics"]["world_attributes"]


def heldout(tmp_path: Path, modality: str) -> list[dict]:
    folder = tmp_path / "cache" / "world_heldout" / f"synthetic_{modality}"
    return json.loads((folder / f"synthetic_{modality}.json").read_text())


def test_captions_stating_the_truth_score_one_and_others_near_zero(tmp_path):
    run_python(
        [
            sys.executable,
            "-c",
            "from nextgpt.evaluation.readers import read_world; "
            f"read_world({str(tmp_path / 'cache' / 'world_heldout')!r}, 'image', num=30)",
        ],
        cwd=REPO_ROOT,
        check=True,
    )
    items = [e for e in heldout(tmp_path, "image") if " and a " not in e["caption"]]
    right = tmp_path / "right.json"
    right.write_text(json.dumps([{"image_id": e["id"], "caption": e["caption"].upper()} for e in items]))
    score = evaluate(tmp_path, "task=world_i2t", f"predictions={right}")
    assert score["value"] == 1.0 and score["samples"] == len(items)
    assert score["chance"] == {"colour": 1 / 7, "shape": 1 / 3, "position": 1 / 5}
    shift = {
        "red": "blue",
        "green": "red",
        "blue": "green",
        "yellow": "purple",
        "purple": "orange",
        "orange": "white",
        "white": "yellow",
    }
    wrong = tmp_path / "wrong.json"
    wrong.write_text(
        json.dumps(
            [
                {"image_id": e["id"], "caption": " ".join(shift.get(w, w) for w in e["caption"].split())}
                for e in items
            ]
        )
    )
    score = evaluate(tmp_path, "task=world_i2t", f"predictions={wrong}")
    assert score["by_attribute"]["colour"] == 0.0 and score["by_attribute"]["shape"] == 1.0


@pytest.mark.parametrize("modality,task", [("image", "world_t2i"), ("video", "world_t2v")])
def test_generated_media_are_read_back_by_the_analysers(tmp_path, modality, task):
    """The held-out items' own media as the 'generated' outputs: every attribute is read back; the
    same files under each other's ids are not."""
    run_python(
        [
            sys.executable,
            "-c",
            "from nextgpt.evaluation.readers import read_world; "
            f"read_world({str(tmp_path / 'cache' / 'world_heldout')!r}, {modality!r}, num=30)",
        ],
        cwd=REPO_ROOT,
        check=True,
    )
    folder = tmp_path / "cache" / "world_heldout" / f"synthetic_{modality}"
    media = folder / MEDIA_DIRS[modality]
    items = [e for e in heldout(tmp_path, modality) if " and a " not in e["caption"]]
    given = tmp_path / "given"
    given.mkdir()
    for e in items:
        shutil.copy(media / e[f"{modality}_name"], given / f"{e['id']}{Path(e[f'{modality}_name']).suffix}")
    score = evaluate(tmp_path, f"task={task}", f"predictions={given}")
    assert score["value"] == 1.0
    assert score["ceiling"].startswith(
        "predictions= scores given outputs without a model"
    )  # needs the decoders
    shuffled = tmp_path / "shuffled"
    shuffled.mkdir()
    for a, b in zip(items, items[1:] + items[:1], strict=False):
        shutil.copy(
            media / b[f"{modality}_name"], shuffled / f"{a['id']}{Path(b[f'{modality}_name']).suffix}"
        )
    assert evaluate(tmp_path, f"task={task}", f"predictions={shuffled}")["value"] < 0.7
