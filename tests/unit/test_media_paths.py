"""Media names from data files stay inside their data root: one helper (``media_path``), used by
every reader of a data file's media names."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datamodules.nextgpt_layout import OUTSIDE_ROOT, Skip, media_path, read_source
from datamodules.prepare import read_conversations


def png(path: Path, value: int = 100) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path)
    return path


# --- the helper ------------------------------------------------------------------------------
def test_media_path_keeps_names_inside_the_root(tmp_path: Path) -> None:
    root = tmp_path / "data" / "images"
    png(root / "a.png")
    png(root / "sub" / "b.png")
    outside = png(tmp_path / "secret.png")
    (root / "alias.png").symlink_to(root / "a.png")  # a link that stays inside: fine
    (root / "link.png").symlink_to(outside)  # a link in the media folder that points out: refused
    (root / "elsewhere").symlink_to(tmp_path, target_is_directory=True)
    linked_root = tmp_path / "linked_images"
    linked_root.symlink_to(root, target_is_directory=True)  # the media folder itself a link: fine

    for name in ("a.png", "sub/b.png", "sub/../a.png", "alias.png", "not_there_yet.png"):
        assert (
            media_path(root, name) == root / name
        )  # joined, not resolved: keys and logs keep the data's names
    assert media_path(linked_root, "a.png") == linked_root / "a.png"
    assert media_path(str(root), Path("sub/b.png")) == root / "sub" / "b.png"

    for name in (
        "../../secret.png",
        "sub/../../../secret.png",
        "..",
        str(outside),
        "/etc/hostname",
        "link.png",
        "elsewhere/secret.png",
    ):
        with pytest.raises(Skip) as e:
            media_path(root, name)
        assert str(e.value) == OUTSIDE_ROOT  # the reason counted
        assert (
            repr(name) in e.value.detail and str(root.resolve()) in e.value.detail
        )  # what the log line names


def test_media_path_relative_root(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    png(tmp_path / "d" / "images" / "a.png")
    assert media_path(Path("d/images"), "a.png") == Path("d/images/a.png")
    with pytest.raises(Skip):
        media_path(Path("d/images"), "../../d/../x.png")


# --- every reader uses it --------------------------------------------------------------------
def nextgpt_layout(tmp_path: Path) -> tuple[Path, list[str]]:
    root = tmp_path / "src"
    png(root / "images" / "a.png")
    png(tmp_path / "secret.png", 7)
    bad = ["../../secret.png", str(tmp_path / "secret.png")]
    pairs = [{"image_name": "a.png", "caption": "good"}] + [{"image_name": b, "caption": "bad"} for b in bad]
    (root / "src.json").write_text(json.dumps(pairs))
    conv = lambda h, a: [{"from": "human", "value": h}, {"from": "gpt", "value": a}]  # noqa: E731
    (root / "src_comprehension.json").write_text(
        json.dumps(
            [{"input_image": n, "conversations": conv("<image>\nWhat?", "Shapes.")} for n in ["a.png", *bad]]
        )
    )
    (root / "src_generation.json").write_text(
        json.dumps(
            [
                {"output_image": n, "image_captions": "c", "conversations": conv("Draw", "<image>")}
                for n in ["a.png", *bad]
            ]
        )
    )
    return root, bad


@pytest.mark.parametrize(
    "objective,files",
    [
        ("caption", ["src.json"]),
        ("generate", ["src.json"]),
        ("instruct", ["src_comprehension.json", "src_generation.json"]),
    ],
)
def test_nextgpt_readers_skip_media_outside_the_root(
    tmp_path: Path, caplog, objective: str, files: list[str]
) -> None:
    root, bad = nextgpt_layout(tmp_path)
    with caplog.at_level(logging.WARNING, logger="datamodules.nextgpt_layout"):
        convs, skipped = read_source("src", "image", root, objective)
    assert skipped == Counter({OUTSIDE_ROOT: 2 * len(files)})
    assert all(Path(p).name == "a.png" for c in convs for _, p in [*c.media_in, *c.media_out])
    assert len(convs) == len(files)
    for f in files:
        for i, name in enumerate(bad, start=1):
            (line,) = [
                r.getMessage()
                for r in caplog.records
                if f"{root / f} entry {i}: {OUTSIDE_ROOT}" in r.getMessage()
            ]
            assert repr(name) in line
    caplog.clear()
    read_source("src", "image", root, objective, warn=False)  # e.g. rank 1: counted, not named again
    assert not caplog.records


def test_conversation_reader_skips_media_outside_the_media_root(tmp_path: Path) -> None:
    png(tmp_path / "m" / "a.png")
    conv = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "Shapes."}]
    entries = [
        {"id": "ok", "image": "a.png", "conversations": conv},
        {"id": "up", "image": "../a.png", "conversations": conv},
        {"id": "list", "image": ["a.png", "/etc/hostname"], "conversations": conv},
    ]
    (tmp_path / "c.json").write_text(json.dumps(entries))
    records, skipped = read_conversations(tmp_path / "c.json", tmp_path / "m")
    assert [r.key for r in records] == ["ok"] and skipped == Counter({OUTSIDE_ROOT: 2})
