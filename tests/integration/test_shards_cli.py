"""train.py on WebDataset shards: written from the NExT-GPT layout on first use, img2dataset shards
read as they are, a weighted instruction mix for stage 3, and exact mid-epoch resume."""

from __future__ import annotations

import json

import pytest

from tests.cli import shard_dir, train

pytestmark = [pytest.mark.slow, pytest.mark.real_data]


def test_stage1_cc3m_from_shards(tiny_cache, sample_root, tmp_path):
    res = train(
        tmp_path,
        tiny_cache,
        "stage=1",
        "dataset=cc3m",
        f"paths.data_root={sample_root}",
        "trainer.max_steps=3",
        "logger=csv",
        "stage.batch_size=4",
        "dataset.num_workers=0",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    shards = sorted(shard_dir(tmp_path, "cc3m").glob("cc3m-pairs-*.tar"))
    index = json.loads((shard_dir(tmp_path, "cc3m") / "cc3m-pairs.shards.json").read_text())
    expected = len(json.loads((sample_root / "cc3m" / "cc3m.json").read_text()))
    assert shards and index["total"] == expected
    assert "writing pairs shards of 'cc3m'" in res.stderr + res.stdout
    # a second run reads the shards it finds, writing nothing
    again = train(
        tmp_path,
        tiny_cache,
        "stage=1",
        "dataset=cc3m",
        f"paths.data_root={sample_root}",
        "trainer.max_steps=1",
        "logger=csv",
        "stage.batch_size=4",
        "dataset.num_workers=0",
    )
    assert again.returncode == 0 and "writing pairs shards" not in again.stderr + again.stdout


def test_stage1_on_img2dataset_shards(tiny_cache, sample_root, tmp_path):
    shards = sample_root.parent / "img2dataset_cc3m"
    if not shards.is_dir():
        pytest.skip(f"img2dataset shards not found at {shards}")
    res = train(
        tmp_path,
        tiny_cache,
        "stage=1",
        "dataset=webdataset",
        f"dataset.urls={shards}",
        "dataset.modality=image",
        "trainer.max_steps=3",
        "logger=csv",
        "stage.batch_size=4",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"{len(list(shards.glob('*.tar')))} shards x weight 1" in res.stderr + res.stdout


def test_stage3_on_a_weighted_instruction_mix(tiny_cache, sample_root, tmp_path):
    common = [f"paths.data_root={sample_root}", "logger=csv", "stage.batch_size=4", "dataset=nextgpt_mix"]
    assert train(tmp_path, tiny_cache, "stage=1", "trainer.max_steps=1", *common).returncode == 0
    assert train(tmp_path, tiny_cache, "stage=2", "trainer.max_steps=1", *common).returncode == 0
    res = train(tmp_path, tiny_cache, "stage=3", "trainer.max_steps=4", *common)
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stderr + res.stdout
    n = {
        m: sum(
            len(json.loads((sample_root / m / f"{m}_{k}.json").read_text()))
            for k in ("comprehension", "generation")
        )
        for m in ("cc3m", "webvid", "audiocap")
    }
    assert (
        f"{n['cc3m'] + n['webvid'] + 2 * n['audiocap']} samples, objective='instruct'" in out
    )  # audiocap weighs 2
    assert json.loads((tmp_path / "bundles" / "stage3" / "meta.json").read_text())["global_step"] == 4


def test_exact_resume_from_shards(tiny_cache, sample_root, tmp_path):
    """Keys seen after a crash-and-resume equal those of an uninterrupted run, step for step."""

    def run(root, *extra):
        return train(
            root,
            tiny_cache,
            "stage=1",
            "dataset=cc3m",
            f"paths.data_root={sample_root}",
            "logger=csv",
            "stage.batch_size=2",
            "dataset.num_workers=2",
            "trainer.max_steps=6",
            "trainer.max_epochs=-1",
            "callbacks.model_checkpoint.every_n_train_steps=2",
            "+callbacks.keys._target_=tests.helpers.RecordKeys",
            f"+callbacks.keys.path={root / 'keys.txt'}",
            *extra,
        )

    straight = tmp_path / "straight"
    assert run(straight).returncode == 0
    resumed = tmp_path / "resumed"
    crashed = run(resumed, "+callbacks.crash._target_=tests.helpers.CrashAfter", "+callbacks.crash.step=3")
    assert crashed.returncode != 0
    again = run(resumed)
    assert again.returncode == 0, again.stderr[-3000:]
    want = (straight / "keys.txt").read_text().splitlines()
    got = (resumed / "keys.txt").read_text().splitlines()
    # the crashed run trained steps 0, 1, 2 (crashing once 3 were done); the resumed run restarts
    # from the step-2 checkpoint and must see exactly the batches of the uninterrupted run
    assert got[:3] == want[:3]
    assert [line.split()[0] for line in got[3:]] == ["2", "3", "4", "5"]
    assert got[3:] == want[2:]
