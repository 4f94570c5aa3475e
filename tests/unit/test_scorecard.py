"""The world scorecard gathers the world_* results of an evaluation sweep into one table, each
attribute beside chance and, for generation, the decoder-alone ceiling; other tasks are left out."""

from __future__ import annotations

import json

from nextgpt.world.scorecard import collect, main, markdown


def result(folder, task, metric):
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(
        json.dumps({"task": task, "metrics": {"world_attributes": metric} if metric else {}})
    )


def test_the_sweep_becomes_one_table(tmp_path, capsys):
    result(
        tmp_path / "sweep" / "world_t2i",
        "world_t2i",
        {
            "value": 0.5,
            "by_attribute": {"colour": 0.75, "position": 0.25},
            "chance": {"colour": 1 / 7, "position": 0.2},
            "ceiling": {"colour": 0.8, "position": 0.3},
        },
    )
    result(
        tmp_path / "sweep" / "world_i2t",
        "world_i2t",
        {"value": 0.9, "by_attribute": {"colour": 0.9}, "chance": {"colour": 1 / 7}},
    )
    result(tmp_path / "sweep" / "i2t_coco", "i2t_coco", None)
    scores = collect([tmp_path / "sweep"])
    assert list(scores) == ["world_i2t", "world_t2i"]  # captioning first, as ORDER says; coco left out
    table = markdown(scores)
    assert (
        "| world_t2i | colour | 0.75 | 0.14 | 0.80 |" in table
        and "| world_i2t | colour | 0.90 | 0.14 | - |" in table
    )
    assert main([str(tmp_path / "sweep"), "--out", str(tmp_path / "out")]) == 0
    assert json.loads((tmp_path / "out" / "scorecard.json").read_text()) == scores
    assert main([str(tmp_path / "empty")]) == 2 and "no world_* results.json" in capsys.readouterr().err
