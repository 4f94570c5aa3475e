"""Bad entries seen from the user's side (``python train.py``, ``python -m datamodules.prepare``):
media names that leave the data root are refused, never read nor packed into a shard, and each bad
sample is counted and warned about once per pass that reaches it (not once per dataloader read)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.cli import ENV, ok, train
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow

QUIET = ["logger=csv", "callbacks.generation_samples=null", "stage.batch_size=4", "trainer.max_steps=-1"]
OUTSIDE = "media path outside the data root"


def secret_png(path: Path) -> bytes:
    """A valid image outside the data root: trainable, and recognisable by its bytes in a shard."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(123).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(path)
    return path.read_bytes()


def good_pairs(tmp_path: Path, cache: Path, good: int) -> tuple[Path, list[dict]]:
    """``data/img`` in the NExT-GPT layout with the first ``good`` synthetic image pairs' files (the
    entries are returned, not written)."""
    src = tmp_path / "data" / "img"
    (src / "images").mkdir(parents=True)
    synthetic = cache / "synthetic" / "synthetic_image"
    entries = json.loads((synthetic / "synthetic_image.json").read_text())[:good]
    for e in entries:
        shutil.copy(synthetic / "images" / e["image_name"], src / "images" / e["image_name"])
    return src, entries


def escaping_source(tmp_path: Path, cache: Path, good: int = 10) -> tuple[Path, Path, list[str]]:
    """``data/img`` in the NExT-GPT layout: ``good`` pairs, then four whose image names leave
    ``data/img/images`` (``..``, ``..`` behind a sub folder, an absolute path, a symlink in the
    media folder pointing out), all naming ``data/secret.png``."""
    src, entries = good_pairs(tmp_path, cache, good)
    secret = tmp_path / "data" / "secret.png"
    secret_png(secret)
    (src / "images" / "link.png").symlink_to(secret)
    bad = ["../../secret.png", "sub/../../../secret.png", str(secret), "link.png"]
    entries += [{"id": f"bad{i}", "image_name": name, "caption": "the secret"} for i, name in enumerate(bad)]
    (src / "img.json").write_text(json.dumps(entries))
    return src, secret, bad


def data_report(root: Path) -> dict:
    (path,) = list((root / "checkpoints").rglob("data_report.json"))
    return json.loads(path.read_text())


def members_with(shards: list[Path], data: bytes) -> list[str]:
    found = []
    for shard in shards:
        with tarfile.open(shard) as tar:
            found += [m.name for m in tar if m.isfile() and tar.extractfile(m).read() == data]
    return found


def assert_names_each_bad_entry(out: str, json_file: Path, bad: list[str], first_index: int) -> None:
    for i, name in enumerate(bad):
        line = next(
            (ln for ln in out.splitlines() if f"{json_file} entry {first_index + i}: {OUTSIDE}" in ln), None
        )
        assert line is not None and name in line, (name, out[-3000:])


# --- media paths outside the data root -----------------------------------------------------------
def test_json_loader_refuses_media_outside_the_data_root(tiny_cache, tmp_path):
    src, _, bad = escaping_source(tmp_path, tiny_cache)
    keys = tmp_path / "keys.txt"
    out = ok(
        train(
            tmp_path,
            tiny_cache,
            "stage=1",
            *QUIET,
            "trainer.max_epochs=1",
            "dataset.max_skip_fraction=0.5",
            f"dataset.sources=[{{name:img,modality:image,root:{src}}}]",
            "+callbacks.keys._target_=tests.helpers.RecordKeys",
            f"+callbacks.keys.path={keys}",
        )
    )
    report = data_report(tmp_path)
    assert report["skipped_by_reason"] == {f"img: {OUTSIDE}": 4} and report["skipped"] == 4
    assert report["samples"] == 14 and report["media_decoded"] == 10  # the 10 good ones, read once
    trained = {k for line in keys.read_text().splitlines() for k in line.split()[1:]}
    assert trained == {f"img_{i:06d}" for i in range(10)}
    assert_names_each_bad_entry(out, src / "img.json", bad, first_index=10)


def test_shard_writer_refuses_media_outside_the_data_root(tiny_cache, tmp_path):
    src, secret, bad = escaping_source(tmp_path, tiny_cache)
    out = ok(
        train(
            tmp_path,
            tiny_cache,
            "stage=1",
            "dataset=cc3m",
            f"paths.data_root={tmp_path / 'data'}",
            *QUIET,
            "trainer.max_epochs=1",
            "dataset.num_workers=0",
            "dataset.max_skip_fraction=0.5",
            "dataset.sources=[{name:img,modality:image,root:" + str(src) + ",weight:1}]",
        )
    )
    folder = tmp_path / "data" / "shards" / "img"
    (index_file,) = list(folder.rglob("img-pairs.shards.json"))
    index = json.loads(index_file.read_text())
    assert index["total"] == 10 and index["skipped"] == {OUTSIDE: 4}
    shards = sorted(folder.rglob("*.tar"))
    assert shards and not members_with(shards, secret.read_bytes())
    report = data_report(tmp_path)
    assert report["skipped_by_reason"] == {f"img: {OUTSIDE} (writing shards)": 4}
    assert_names_each_bad_entry(out, src / "img.json", bad, first_index=10)


def test_prepare_cli_refuses_llava_media_outside_the_media_root(tiny_cache, tmp_path):
    media = tmp_path / "media"
    media.mkdir()
    shutil.copy(next((tiny_cache / "synthetic" / "synthetic_image" / "images").iterdir()), media / "a.png")
    secret = tmp_path / "secret.png"
    data = secret_png(secret)
    conv = lambda h, a: [{"from": "human", "value": h}, {"from": "gpt", "value": a}]  # noqa: E731
    bad = ["../secret.png", str(secret), "x/../../secret.png", "../secret.png"]
    entries = [
        {"id": "good", "image": "a.png", "conversations": conv("<image>\nWhat is it?", "Shapes.")},
        {"id": "up", "image": bad[0], "conversations": conv("<image>\nWhat is it?", "Shapes.")},
        {"id": "abs", "image": bad[1], "conversations": conv("<image>\nWhat is it?", "Shapes.")},
        {"id": "sub", "image": [bad[2]], "conversations": conv("<image>\nWhat is it?", "Shapes.")},
        {
            "id": "out",
            "image": "a.png",
            "output_image": bad[3],
            "image_captions": "the secret",
            "conversations": conv("<image>\nDraw another", "Here: <image>"),
        },
    ]
    json_file = tmp_path / "llava.json"
    json_file.write_text(json.dumps(entries))
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "datamodules.prepare",
            "--format",
            "llava",
            "--json",
            str(json_file),
            "--media-root",
            str(media),
            "--out",
            str(tmp_path / "shards"),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **ENV},
    )
    out = ok(res)
    (index_file,) = list((tmp_path / "shards").rglob("llava.shards.json"))
    index = json.loads(index_file.read_text())
    assert index["total"] == 1 and index["skipped"] == {OUTSIDE: 4}
    shards = sorted((tmp_path / "shards").rglob("*.tar"))
    assert shards and not members_with(shards, data)
    assert_names_each_bad_entry(out, json_file, bad, first_index=1)


# --- one bad sample, counted and warned about once per pass ----------------------------------------
def one_undecodable(tmp_path: Path, cache: Path, good: int = 10) -> tuple[Path, int]:
    """``good`` pairs and, fourth, one whose image file is not an image."""
    src, entries = good_pairs(tmp_path, cache, good)
    entries.insert(3, {"id": "broken", "image_name": "broken.png", "caption": "not an image"})
    (src / "images" / "broken.png").write_bytes(b"not an image")
    (src / "img.json").write_text(json.dumps(entries))
    return src, len(entries)


@pytest.mark.parametrize("epochs", [1, 3])
def test_one_bad_sample_is_counted_and_warned_once_per_pass_with_dataloader_workers(
    tiny_cache, tmp_path, epochs
):
    """Two dataloader workers read ahead of the trainer (into the next pass, on 11 samples); what
    they read but the trainer never received is read again later: it must not be counted or
    warned about twice. Before the fix: one pass warned 3 times; three passes stopped the run
    with "4 of 33 samples skipped" (1 bad sample in 11)."""
    src, n = one_undecodable(tmp_path, tiny_cache)
    out = ok(
        train(
            tmp_path,
            tiny_cache,
            "stage=1",
            "dataset=cc3m",
            f"paths.data_root={tmp_path / 'data'}",
            *QUIET,
            f"trainer.max_epochs={epochs}",
            "dataset.num_workers=2",
            "dataset.max_skip_fraction=0.1",
            "dataset.sources=[{name:img,modality:image,root:" + str(src) + ",weight:1}]",
        )
    )
    report = data_report(tmp_path)
    warnings = [ln for ln in out.splitlines() if "WARNING" in ln and ":broken: undecodable media" in ln]
    skips = report["skipped_by_reason"].get("undecodable media", 0)
    assert report["skipped_by_reason"] == {"undecodable media": skips} and report["skipped"] == skips
    passes = math.ceil(report["samples"] / n)  # passes the trainer reached into
    assert epochs <= skips <= passes, (skips, passes)  # at most once per pass
    assert len(warnings) == skips, warnings  # one warning line per counted skip
    assert report["epochs"] == epochs
    if epochs == 1:
        assert skips == 1 and len(warnings) == 1
    else:
        assert f"over {epochs} epochs (a sample bad in each is skipped in each)" in out


def test_one_bad_entry_of_the_json_loader_is_counted_and_warned_once(tiny_cache, tmp_path):
    src, n = one_undecodable(tmp_path, tiny_cache)
    entries = json.loads((src / "img.json").read_text())
    (src / "images" / "broken.png").unlink()
    entries[3] = {"id": "nocaption", "image_name": entries[4]["image_name"]}  # no caption: dropped when read
    (src / "img.json").write_text(json.dumps(entries))
    out = ok(
        train(
            tmp_path,
            tiny_cache,
            "stage=1",
            *QUIET,
            "trainer.max_epochs=1",
            "dataset.num_workers=2",
            f"dataset.sources=[{{name:img,modality:image,root:{src}}}]",
        )
    )
    report = data_report(tmp_path)
    assert report["skipped_by_reason"] == {"img: missing caption": 1} and report["samples"] == n
    assert len([ln for ln in out.splitlines() if "entry 3: missing caption" in ln]) == 1
