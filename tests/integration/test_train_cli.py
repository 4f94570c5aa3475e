"""The user's literal commands, run as subprocesses of train.py."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests import cli


def train(*args, **kwargs):
    """``python train.py ...`` as a subprocess: these tests prove the command line itself."""
    return cli.train(*args, subprocess_=True, **kwargs)


pytestmark = pytest.mark.slow


def test_multirun_three_stages_in_order(tiny_cache, tmp_path):
    """`python train.py -m stage=1,2,3`: each job starts from the bundle the previous one wrote."""
    res = train(tmp_path, tiny_cache, "-m", "stage=1,2,3", "trainer.max_steps=2", "stage.batch_size=4")
    assert res.returncode == 0, res.stderr[-3000:]
    for stage in (1, 2, 3):
        meta = json.loads((tmp_path / "bundles" / f"stage{stage}" / "meta.json").read_text())
        assert meta["stage"] == stage and meta["global_step"] == 2
    assert "stage 2: started from bundle" in res.stderr + res.stdout
    assert "stage 3: started from bundle" in res.stderr + res.stdout
    # W&B is the default logger and runs offline without an API key
    runs = sorted((tmp_path / "logs").rglob("offline-run-*"))
    assert len(runs) == 3 and len({r.parents[1].name for r in runs}) == 3, runs  # one W&B run per stage


def test_stage2_webvid_without_data_names_the_path(tiny_cache, tmp_path):
    res = train(tmp_path, tiny_cache, "stage=2", "dataset=webvid")
    assert res.returncode == 2
    assert str(tmp_path / "data" / "T_X_pair_data" / "webvid" / "webvid.json") in res.stderr


@pytest.mark.real_data
def test_stage1_on_the_real_cc3m_sample(tiny_cache, sample_root, tmp_path):
    """`python train.py stage=1 dataset=cc3m paths.data_root=DIR trainer.max_steps=2` on real images."""
    res = train(
        tmp_path,
        tiny_cache,
        "stage=1",
        "dataset=cc3m",
        f"paths.data_root={sample_root}",
        "trainer.max_steps=2",
        "logger=csv",
        "stage.batch_size=4",
        "dataset.num_workers=0",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((tmp_path / "bundles" / "stage1" / "meta.json").read_text())["global_step"] == 2


@pytest.mark.real_data
def test_stage2_on_the_real_webvid_sample(tiny_cache, sample_root, tmp_path):
    """Stage 1 decodes the real sample videos; then the issue's literal stage-2 command runs on them."""
    common = ["dataset=webvid", f"paths.data_root={sample_root}", "trainer.max_steps=2", "logger=csv"]
    res1 = train(tmp_path, tiny_cache, "stage=1", *common, "stage.batch_size=4", "dataset.num_workers=0")
    assert res1.returncode == 0, res1.stderr[-3000:]
    res2 = train(tmp_path, tiny_cache, "stage=2", *common)
    assert res2.returncode == 0, res2.stderr[-3000:]
    meta = json.loads((tmp_path / "bundles" / "stage2" / "meta.json").read_text())
    assert meta["global_step"] == 2 and meta["init_from"].endswith("stage1")


def test_interrupted_run_resumes_from_last_checkpoint(tiny_cache, tmp_path):
    args = [
        "stage=1",
        "logger=csv",
        "trainer.max_steps=4",
        "stage.batch_size=4",
        "callbacks.model_checkpoint.every_n_train_steps=2",
    ]
    crashed = train(
        tmp_path,
        tiny_cache,
        *args,
        "+callbacks.crash._target_=tests.helpers.CrashAfter",
        "+callbacks.crash.step=3",
    )
    assert crashed.returncode != 0 and "simulated crash after step 3" in crashed.stderr
    runs = [p for p in (tmp_path / "checkpoints" / "tiny" / "synthetic" / "stage1").iterdir() if p.is_dir()]
    assert len(runs) == 1, runs  # one run folder, named by the run's key (and its lock file beside it)
    last = runs[0] / "last.ckpt"
    assert last.is_file() and not (tmp_path / "bundles" / "stage1").exists()
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 2
    # the checkpoint holds the trainable tensors only, never a frozen backbone weight
    assert set(ckpt["state_dict"]) == {
        "model.input_projector.proj.weight",
        "model.input_projector.proj.bias",
        "model.new_tokens.markers.embed",
        "model.new_tokens.markers.head",
    }

    resumed = train(tmp_path, tiny_cache, *args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming stage 1 from {last}" in resumed.stderr + resumed.stdout
    meta = json.loads((tmp_path / "bundles" / "stage1" / "meta.json").read_text())
    assert meta["global_step"] == 4
    assert not last.exists()  # a finished run's last.ckpt is retired
    assert json.loads((runs[0] / "run.json").read_text())["status"] == "finished"
    weights = load_file(str(tmp_path / "bundles" / "stage1" / "trainable.safetensors"))
    assert torch.isfinite(weights["input_projector.proj.weight"]).all()


def test_a_run_over_the_device_memory_is_refused_by_its_plan(tiny_cache, tmp_path):
    res = train(tmp_path, tiny_cache, "stage=1", "plan.device_memory_gib=0.001", "logger=csv")
    out = res.stdout + res.stderr
    assert res.returncode == 2, out[-3000:]
    assert "the memory plan needs" in out and "more than the device's 0.0 GiB" in out and "activations" in out
    assert "plan.allow_over_memory=true" in out
    # refused as the trainer set up: no weight loaded, the model never built (configure_model logs its counts)
    assert "Loading weights" not in out and "Stage1EncodingAlignment): trainable" not in out
    (record,) = (tmp_path / "checkpoints").rglob("run.json")
    assert json.loads(record.read_text())["status"] == "refused"
    assert not list(record.parent.glob("*.ckpt"))  # nothing to resume: nothing was trained


def test_packed_batches_train_stages_1_and_2(tiny_cache, tmp_path):
    res = train(
        tmp_path, tiny_cache, "-m", "stage=1,2", "dataset.pack=true", "trainer.max_steps=2", "logger=csv"
    )
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    assert out.count("(2 trained in this run)") == 2
