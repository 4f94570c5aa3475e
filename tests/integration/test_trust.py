"""Never silently wrong, from the user's side (issue 22): a checkpoint never runs code, a run
trains on the data it names, nothing hangs, and bad input is refused before any weight loads,
naming the file, key or folder at fault."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

from tests.cli import ENV, ok, refused, train
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow

QUIET = ["logger=csv", "callbacks.generation_samples=null", "stage.batch_size=4"]
DDP = ["strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu"]


class Payload:
    """Unpickling this runs ``touch <marker>``: what a hostile checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def hostile_checkpoint(path: Path, marker: Path) -> Path:
    torch.save({"global_step": 1, "state_dict": {}, "loops": Payload(marker)}, path)
    return path


def nextgpt_root(tmp_path: Path, cache: Path, name: str, n: int | None = None) -> Path:
    """A data root holding ``<name>/<name>.json`` + ``images/``: the synthetic images in the NExT-GPT
    layout under the name a dataset config reads (``dataset=cc3m`` reads ``<data_root>/cc3m``)."""
    src = cache / "synthetic" / "synthetic_image"
    dst = tmp_path / name
    shutil.copytree(src / "images", dst / "images")
    entries = json.loads((src / "synthetic_image.json").read_text())[:n]
    (dst / f"{name}.json").write_text(json.dumps(entries))
    return tmp_path


def shard_members(shards: Path) -> dict[str, bytes]:
    out = {}
    for tar in sorted(shards.rglob("*.tar")):
        with tarfile.open(tar) as t:
            for m in t.getmembers():
                if m.name.endswith((".png", ".jpg")):
                    out[f"{tar.parent.name}/{m.name}"] = t.extractfile(m).read()
    return out


# --- nothing executes from a file -----------------------------------------------------------------
def test_a_checkpoint_that_would_run_code_is_refused_and_nothing_runs(tiny_cache, tmp_path):
    """`resume=evil.ckpt`, and the same file found as the last checkpoint of an interrupted run:
    exit 2 naming the file; the payload's marker file is never created."""
    marker = tmp_path / "PWNED"
    evil = hostile_checkpoint(tmp_path / "evil.ckpt", marker)
    refused(
        train(tmp_path, tiny_cache, "stage=1", f"resume={evil}", "trainer.max_steps=2", *QUIET),
        str(evil),
        "arbitrary unpickling",
    )
    assert not marker.exists()

    ok(train(tmp_path, tiny_cache, "stage=1", "trainer.max_steps=1", *QUIET))
    (run,) = [p for p in (tmp_path / "checkpoints").rglob("run.json")]
    record = json.loads(run.read_text())
    run.write_text(json.dumps({**record, "status": "running"}))  # as a killed run leaves it
    hostile_checkpoint(run.parent / "last.ckpt", marker)
    refused(
        train(tmp_path, tiny_cache, "stage=1", "trainer.max_steps=1", *QUIET),
        str(run.parent / "last.ckpt"),
        "arbitrary unpickling",
    )
    assert not marker.exists()


# --- data identity ----------------------------------------------------------------------------------
def test_a_second_root_with_equal_names_and_other_bytes_trains_on_its_own_bytes(tiny_cache, tmp_path):
    """Two data roots, the same dataset name, JSON and file names, other image bytes: each run's
    shards hold its own root's bytes, in a folder of their own; the runs are two runs."""
    a = nextgpt_root(tmp_path / "a", tiny_cache, "cc3m", n=8)
    b = nextgpt_root(tmp_path / "b", tiny_cache, "cc3m", n=8)
    images = sorted((b / "cc3m" / "images").iterdir())
    for img, other in zip(images, images[1:] + images[:1], strict=False):  # each name now holds another image
        img.write_bytes((a / "cc3m" / "images" / other.name).read_bytes())
    common = ["stage=1", "dataset=cc3m", "dataset.num_workers=0", "trainer.max_steps=1", *QUIET]
    ok(train(tmp_path, tiny_cache, *common, f"paths.data_root={a}"))
    first = shard_members(tmp_path / "data" / "shards")
    out = ok(train(tmp_path, tiny_cache, *common, f"paths.data_root={b}"))
    assert "writing pairs shards of 'cc3m' from " + str(b / "cc3m") in out  # not the first root's shards
    members = shard_members(tmp_path / "data" / "shards")
    theirs = {k: v for k, v in members.items() if k not in first}
    assert len(theirs) == len(first) == 8
    b_bytes = {p.read_bytes() for p in images}
    a_bytes = {p.read_bytes() for p in (a / "cc3m" / "images").iterdir()}
    assert set(first.values()) <= a_bytes and set(theirs.values()) <= b_bytes
    by_name_a = {k.split("/", 1)[1]: v for k, v in first.items()}
    assert any(
        by_name_a[k.split("/", 1)[1]] != v for k, v in theirs.items()
    )  # same member names, other bytes
    runs = list((tmp_path / "checkpoints").rglob("run.json"))
    assert len(runs) == 2

    # the data root's media change in place (same names, same JSON): shards of the new bytes
    images[0].write_bytes(images[1].read_bytes())
    os.utime(images[0], ns=(time.time_ns(), time.time_ns()))
    out = ok(train(tmp_path, tiny_cache, *common, f"paths.data_root={b}"))
    assert "changed since the shards" in out and "media" in out


def test_a_missing_or_empty_data_root_stops_naming_it(tiny_cache, tmp_path):
    """A `paths.data_root` that does not exist (shards of another root are there), a JSON with no
    entries, a JSON whose every entry is unusable: exit 2 naming the folder or the JSON file."""
    root = nextgpt_root(tmp_path / "good", tiny_cache, "cc3m", n=6)
    common = ["stage=1", "dataset=cc3m", "dataset.num_workers=0", "trainer.max_steps=1", *QUIET]
    ok(train(tmp_path, tiny_cache, *common, f"paths.data_root={root}"))
    missing = tmp_path / "nowhere"
    refused(train(tmp_path, tiny_cache, *common, f"paths.data_root={missing}"), str(missing / "cc3m"))

    empty = nextgpt_root(tmp_path / "empty", tiny_cache, "cc3m", n=0)
    refused(
        train(tmp_path, tiny_cache, *common, f"paths.data_root={empty}"),
        str(empty / "cc3m" / "cc3m.json"),
        "no usable sample",
    )

    unusable = nextgpt_root(tmp_path / "unusable", tiny_cache, "cc3m", n=6)
    shutil.rmtree(unusable / "cc3m" / "images")
    refused(
        train(tmp_path, tiny_cache, *common, f"paths.data_root={unusable}"),
        str(unusable / "cc3m" / "cc3m.json"),
        "no usable sample",
        "missing media file",
    )


def test_all_bad_samples_stop_even_with_a_skip_limit_of_one(tiny_cache, tmp_path):
    """Every image undecodable and `dataset.max_skip_fraction=1.0`: the run stops after one pass
    (it used to skip forever), naming the reason, with a log of bounded size."""
    root = nextgpt_root(tmp_path / "bad", tiny_cache, "cc3m", n=6)
    for img in (root / "cc3m" / "images").iterdir():
        img.write_bytes(b"not an image at all")
    res = train(
        tmp_path,
        tiny_cache,
        "stage=1",
        "dataset=cc3m",
        f"paths.data_root={root}",
        "dataset.num_workers=0",
        "dataset.max_skip_fraction=1.0",
        "trainer.max_steps=5",
        *QUIET,
        timeout=240,
    )
    out = refused(res, "no usable sample in a whole pass", "undecodable media")
    assert len(out) < 200_000


# --- inputs checked before work ---------------------------------------------------------------------
def test_an_appended_key_nothing_reads_is_refused_before_anything_loads(tiny_cache, tmp_path):
    out = refused(
        train(tmp_path, tiny_cache, "stage=1", "+stage.optim.learning_rate=0.1", *QUIET),
        "+stage.optim.learning_rate",
        "stage.optim has",
        "lr",
    )
    assert "trainable" not in out  # refused before the model was built
    refused(
        train(tmp_path, tiny_cache, "stage=1", "+stage.optim.optimizer.bettas=[0.9,0.95]", *QUIET),
        "did you mean stage.optim.optimizer.betas",
    )
    assert not (tmp_path / "checkpoints").exists()


def test_an_unwritable_bundle_folder_is_found_before_training(tiny_cache, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    out = refused(
        train(
            tmp_path,
            tiny_cache,
            "stage=1",
            f"paths.bundles={blocker / 'bundles'}",
            "trainer.max_steps=1",
            *QUIET,
        ),
        f"paths.bundles='{blocker / 'bundles'}'",
        "can not be written",
    )
    assert "Epoch" not in out and not list((tmp_path / "checkpoints").rglob("*.ckpt"))


# --- concurrent runs ---------------------------------------------------------------------------------
def test_the_same_run_started_twice_at_once_is_refused_naming_the_first(tiny_cache, tmp_path):
    """Two identical commands at once: the second exits 2 naming the first's pid; once the first is
    killed, the same command resumes its run (the lock died with it)."""
    args = [
        "stage=1",
        "trainer.max_steps=100000",
        "trainer.max_epochs=-1",
        "callbacks.model_checkpoint.every_n_train_steps=5",
        *QUIET,
    ]  # runs until it is killed
    cmd = [
        sys.executable,
        "train.py",
        *args,
        f"paths.root={tmp_path}",
        f"paths.cache_dir={tiny_cache}",
        "print_config=false",
    ]
    first = subprocess.Popen(
        cmd,
        cwd=REPO_ROOT,
        env={**os.environ, **ENV},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not list((tmp_path / "checkpoints").rglob("step*.ckpt")):
            assert first.poll() is None and time.monotonic() < deadline, (
                "the first run ended before its first checkpoint"
            )
            time.sleep(0.5)
        second = train(tmp_path, tiny_cache, *args)
        refused(second, f"pid {first.pid}", "is being trained by")
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    # the same run (callbacks are not part of its identity), stopped by a crash one step after it resumed
    again = train(
        tmp_path,
        tiny_cache,
        *args,
        "+callbacks.crash._target_=tests.helpers.CrashAfter",
        "+callbacks.crash.step=0",
    )
    out = again.stdout + again.stderr
    assert "resuming stage 1 from" in out and "simulated crash after step" in out, out[-3000:]


# --- nothing hangs -----------------------------------------------------------------------------------
@pytest.mark.distributed
def test_ddp_on_a_one_sample_data_set_finishes_within_a_minute(tiny_cache, tmp_path):
    """`strategy=ddp` on 2 gloo processes over a shard data set of one sample: rank 1 owns no sample
    of a pass, and used to wait forever; now both ranks read it and the run ends."""
    root = nextgpt_root(tmp_path / "one", tiny_cache, "cc3m", n=1)
    start = time.monotonic()
    ok(
        train(
            tmp_path,
            tiny_cache,
            "stage=1",
            "dataset=cc3m",
            f"paths.data_root={root}",
            "dataset.num_workers=0",
            *DDP,
            "trainer.max_steps=2",
            *QUIET,
            timeout=120,
        )
    )
    assert time.monotonic() - start < 60 + 30  # a minute of training, plus the two processes' start-up
