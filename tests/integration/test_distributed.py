"""Many processes train exactly as one: DDP and FSDP2 over 2 gloo processes on the CPU, multi-node
through torchrun, kill and resume, and every loss normalised over the global batch.

The data is the synthetic set (images, sounds, videos, shuffled): with a few samples per rank,
steps where one rank has a modality that another lacks are the rule, which is what used to hang
(an output projector without gradient on one rank).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.cli import ENV, bundle_meta, free_port, ok, recorded_batches, train
from tests.conftest import REPO_ROOT

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

DDP = ["strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu"]
FSDP = ["strategy=fsdp", "trainer.devices=2", "trainer.accelerator=cpu"]
QUIET = ["logger=csv", "callbacks.generation_samples=null"]
NO_DROPOUT = ["model.output_projector.dropout=0", "model.lora.dropout=0"]
RECORD = "+callbacks.keys._target_=tests.helpers.RecordKeys"
MODALITY = {"img": "image", "aud": "audio", "vid": "video"}


def modalities(keys: list[str]) -> set[str]:
    return {MODALITY[k[:3]] for k in keys}


def weights(root: Path, stage: int) -> dict[str, torch.Tensor]:
    return load_file(str(root / "bundles" / f"stage{stage}" / "trainable.safetensors"))


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


# --- the literal commands ------------------------------------------------------------------------
def test_every_stage_under_ddp_chained_with_batches_lacking_a_modality(tiny_cache, tmp_path):
    """`python train.py -m stage=1,2,3 strategy=ddp trainer.devices=2 trainer.accelerator=cpu trainer.max_steps=4`:
    each stage (the config `stage=N ...` runs alone) from the previous bundle, 2 samples per rank and step."""
    keys = tmp_path / "keys"
    out = ok(
        train(
            tmp_path,
            tiny_cache,
            "-m",
            "stage=1,2,3",
            *DDP,
            "trainer.max_steps=4",
            *QUIET,
            "stage.batch_size=2",
            RECORD,
            f"+callbacks.keys.path={keys}" + "${stage.number}.txt",
        )
    )
    assert "GLOBAL_RANK: 0" in out and "GLOBAL_RANK: 1" in out
    assert (
        out.count(
            "world size 2 (2 device(s) x 1 node(s)), per-device batch 2, gradient accumulation 1, "
            "global batch 4"
        )
        >= 3
    )
    for stage in (1, 2, 3):
        meta = bundle_meta(tmp_path, stage)
        assert meta["stage"] == stage and meta["global_step"] == 4
        steps = [recorded_batches(Path(f"{keys}{stage}.txt.rank{r}")) for r in (0, 1)]
        assert sorted(steps[0]) == sorted(steps[1]) == [0, 1, 2, 3]  # the same steps on both ranks
        # the condition that used to hang: a modality on one rank that the other lacks
        uneven = [s for s in range(4) if modalities(steps[0][s]) != modalities(steps[1][s])]
        assert uneven, (
            f"stage {stage}: every step had the same modalities on both ranks; the test data is too even"
        )
    assert bundle_meta(tmp_path, 2)["init_from"] == str(tmp_path / "bundles" / "stage1")
    assert bundle_meta(tmp_path, 3)["init_from"] == str(tmp_path / "bundles" / "stage2")
    assert out.count("stage 3: started from bundle") >= 1


# --- equivalence: 2 processes x b == 1 process x 2b == 1 process x b x 2 accumulated ---------------
TOLERANCE = 3e-5  # float32 sums in another order, through 3 AdamW steps; the steps move weights ~1e-3


@pytest.fixture(scope="module")
def init_bundles(tiny_cache, tmp_path_factory) -> Path:
    """Stage-1 and stage-2 bundles (one step each) that every equivalence run of stages 2 and 3 starts from."""
    root = tmp_path_factory.mktemp("init_bundles")
    for stage in (1, 2):
        ok(train(root, tiny_cache, f"stage={stage}", "trainer.max_steps=1", "stage.batch_size=4", *QUIET))
    return root / "bundles"


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_two_processes_equal_one_process_on_the_same_global_batch(stage, init_bundles, tiny_cache, tmp_path):
    common = [f"stage={stage}", "trainer.max_steps=3", "trainer.max_epochs=-1", *QUIET, *NO_DROPOUT]
    if stage > 1:
        common.append(f"init_from={init_bundles / f'stage{stage - 1}'}")
    runs = {
        "ddp 2 x 4": [*DDP, "stage.batch_size=4"],
        "1 x 8": ["stage.batch_size=8"],
        "1 x 4, accumulate 2": ["stage.batch_size=4", "trainer.accumulate_grad_batches=2"],
    }
    if (
        stage > 1
    ):  # the output projectors that batches lack: FSDP2 too (stage 1 sharded: fully_shard test below)
        runs["fsdp2 2 x 4"] = [*FSDP, "stage.batch_size=4"]
    if stage == 1:  # the control: a different global batch must move the weights measurably
        runs["1 x 4 (another batch)"] = ["stage.batch_size=4"]
    got = {}
    for name, extra in runs.items():
        root = tmp_path / "".join(c if c.isalnum() else "_" for c in name)
        ok(train(root, tiny_cache, *common, *extra))
        got[name] = weights(root, stage)
    reference = got.pop("1 x 8")
    control = got.pop("1 x 4 (another batch)", None)
    for name, w in got.items():
        diff = max_diff(w, reference)
        assert diff < TOLERANCE, f"stage {stage}: {name} differs from 1 x 8 by {diff:.2e}"
    if control is not None:
        moved = max_diff(control, reference)
        assert moved > 30 * TOLERANCE, f"stage {stage}: a different batch moved the weights only {moved:.2e}"


# --- kill and resume ------------------------------------------------------------------------------
def test_kill_and_resume_under_ddp_continues_with_the_same_batches(tiny_cache, tmp_path):
    args = [
        "stage=1",
        *DDP,
        "trainer.max_steps=6",
        "stage.batch_size=4",
        *QUIET,
        "callbacks.model_checkpoint.every_n_train_steps=2",
        RECORD,
    ]
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    ok(train(whole, tiny_cache, *args, f"+callbacks.keys.path={whole / 'keys.txt'}"))
    crashed = train(
        broken,
        tiny_cache,
        *args,
        f"+callbacks.keys.path={broken / 'keys.txt'}",
        "+callbacks.crash._target_=tests.helpers.CrashAfter",
        "+callbacks.crash.step=3",
    )
    assert crashed.returncode != 0 and "simulated crash after step 3" in crashed.stderr + crashed.stdout
    assert not (broken / "bundles" / "stage1").exists()
    out = ok(train(broken, tiny_cache, *args, f"+callbacks.keys.path={broken / 'keys.txt'}"))
    assert "resuming stage 1 from" in out and "dataloader is not resumable" not in out
    for rank in (0, 1):
        uninterrupted = recorded_batches(whole / f"keys.txt.rank{rank}")
        resumed = recorded_batches(broken / f"keys.txt.rank{rank}")
        assert sorted(uninterrupted) == list(range(6))
        assert resumed == uninterrupted, f"rank {rank}: the resumed run saw other batches"
    assert bundle_meta(broken, 1)["global_step"] == 6
    assert max_diff(weights(broken, 1), weights(whole, 1)) < TOLERANCE


def test_fsdp2_resumes_from_its_sharded_checkpoint(init_bundles, tiny_cache, tmp_path):
    args = [
        "stage=3",
        *FSDP,
        "trainer.max_steps=4",
        "stage.batch_size=2",
        *QUIET,
        *NO_DROPOUT,
        "callbacks.model_checkpoint.every_n_train_steps=2",
        "trainer.max_epochs=-1",
        f"init_from={init_bundles / 'stage2'}",
    ]
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    ok(train(whole, tiny_cache, *args))
    crashed = train(
        broken,
        tiny_cache,
        *args,
        "+callbacks.crash._target_=tests.helpers.CrashAfter",
        "+callbacks.crash.step=3",
    )
    assert crashed.returncode != 0
    (run,) = (
        p for p in (broken / "checkpoints" / "tiny" / "synthetic" / "stage3").iterdir() if p.is_dir()
    )  # beside: <run>.lock
    ckpt = run / "last.ckpt"
    assert ckpt.is_dir() and sorted(p.name for p in ckpt.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    out = ok(train(broken, tiny_cache, *args))
    assert "resuming stage 3 from" in out
    assert bundle_meta(broken, 3)["global_step"] == 4
    assert max_diff(weights(broken, 3), weights(whole, 3)) < TOLERANCE


# --- sharding with torch's own FSDP2, outside Lightning -----------------------------------------
@pytest.mark.parametrize("stage", [1, 3])
def test_fully_shard_step_equals_one_process(stage, tiny_cache, tmp_path):
    """The real NextGPT stage, sharded over 2 gloo processes with ``fully_shard`` and the policy
    ``strategy=fsdp`` configures: one AdamW step, the trainable tensors gathered, equal to one
    unsharded process on the whole batch. The frozen backbones are sharded too and hold no optimizer state."""
    script = REPO_ROOT / "tests" / "integration" / "fsdp2_step.py"
    env = {**os.environ, **ENV}
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    res = subprocess.run(
        [sys.executable, str(script), str(stage), str(one), str(tiny_cache)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            f"--master-port={free_port()}",
            str(script),
            str(stage),
            str(two),
            str(tiny_cache),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = torch.load(one, weights_only=True), torch.load(two, weights_only=True)
    info = b["info"]
    assert info["world"] == 2 and any(".layers." in u for u in info["units"]), info["units"]
    assert info["frozen_sharded"] and info["frozen_local_fraction"] <= 0.55, info
    assert info["optimizer_state_tensors"] == info["trainable_tensors"] == info["optimizer_tensors"]
    for name, g in a["grads"].items():  # the gradient of every trainable tensor, synchronised
        torch.testing.assert_close(
            b["grads"][name], g, rtol=1e-4, atol=1e-6 * float(g.abs().max()) + 1e-9, msg=name
        )
    assert max_diff(a["state"], b["state"]) < 1e-5


# --- two nodes on one machine ---------------------------------------------------------------------
def test_two_node_torchrun_launch_writes_one_bundle(tiny_cache, tmp_path):
    """Two `torchrun --nnodes 2 --node-rank {0,1} --nproc-per-node 1` launches (one process each,
    rendezvous on 127.0.0.1) with `trainer.num_nodes=2` train stage 1 and write exactly one bundle."""
    port = free_port()

    def cmd(node):
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes",
            "2",
            "--nproc-per-node",
            "1",  # noqa: E731
            f"--node-rank={node}",
            "--master-addr=127.0.0.1",
            f"--master-port={port}",
            "train.py",
            "stage=1",
            "strategy=ddp",
            "trainer.num_nodes=2",
            "trainer.devices=1",
            "trainer.accelerator=cpu",
            "trainer.max_steps=2",
            "stage.batch_size=4",
            *QUIET,
            f"paths.root={tmp_path}",
            f"paths.cache_dir={tiny_cache}",
            "print_config=false",
        ]

    env = {**os.environ, **ENV}
    procs = [
        subprocess.Popen(
            cmd(n), cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for n in (0, 1)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs, strict=False):
        assert p.returncode == 0, out[-4000:]
    assert "world size 2 (1 device(s) x 2 node(s))" in outs[0]
    assert sorted(p.name for p in (tmp_path / "bundles").iterdir()) == ["stage1"]  # no second, no temp folder
    assert bundle_meta(tmp_path, 1)["global_step"] == 2
    # each process logs to its own file, and only rank 0 writes the run's .hydra/ config
    logs = sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "logs").rglob("*.log"))
    assert len(logs) == 2 and any(name.endswith("_rank1.log") for name in logs), logs


# --- shards: fewer shards than consumers, bad samples on one rank ---------------------------------
def test_shards_under_ddp_give_every_rank_the_same_steps(tiny_cache, tmp_path):
    """One shard for 2 ranks x 2 workers, two undecodable images in it: every epoch is the same
    number of batches on both ranks (no rank runs dry and leaves the other in a collective), the
    bad samples are skipped and counted, and two whole epochs run without max_steps."""
    import shutil

    from datamodules.prepare import prepare_nextgpt

    source = tmp_path / "synthetic_image"
    shutil.copytree(tiny_cache / "synthetic" / "synthetic_image", source)
    images = sorted((source / "images").iterdir())
    for bad in images[:2]:
        bad.write_bytes(bad.read_bytes()[:40])  # truncated PNGs
    prepare_nextgpt(source, "synthetic_image", "image", tmp_path / "shards", sets=["pairs"], shard_size=1000)
    assert len(list((tmp_path / "shards").glob("*.tar"))) == 1
    keys = tmp_path / "keys.txt"
    out = ok(
        train(
            tmp_path,
            tiny_cache,
            "stage=1",
            "dataset=webdataset",
            f"dataset.urls={tmp_path / 'shards'}",
            "dataset.modality=image",
            "dataset.num_workers=2",
            *DDP,
            "stage.batch_size=2",
            "trainer.max_epochs=2",
            "dataset.max_skip_fraction=0.25",  # 2 of 24 bad: a running count can pass 10% early in a pass
            *QUIET,
            RECORD,
            f"+callbacks.keys.path={keys}",
            timeout=300,
        )
    )
    per_epoch = -(-len(images) // (2 * 2))  # ceil(samples / (ranks x batch))
    assert bundle_meta(tmp_path, 1)["global_step"] == 2 * per_epoch
    steps = [recorded_batches(Path(f"{keys}.rank{r}")) for r in (0, 1)]
    assert sorted(steps[0]) == sorted(steps[1]) == list(range(2 * per_epoch))
    assert out.count("undecodable media") >= 2


FAKE_SRUN = '''#!{python}
"""srun for one node: starts SLURM_NTASKS_PER_NODE copies of the command with the variables srun sets."""
import os, subprocess, sys
args = [a for a in sys.argv[1:] if not a.startswith("--")]
n = int(os.environ["SLURM_NTASKS_PER_NODE"])
procs = []
for i in range(n):
    env = dict(os.environ, SLURM_PROCID=str(i), SLURM_LOCALID=str(i), SLURM_NODEID="0", SLURM_NTASKS=str(n),
               SLURM_NNODES="1", SLURM_JOB_NAME="nextgpt", SLURM_JOB_ID="4242", SLURM_NODELIST="127.0.0.1")
    procs.append(subprocess.Popen(args, env=env))
sys.exit(max(p.wait() for p in procs))
'''


def test_slurm_template_runs_under_srun(tiny_cache, tmp_path):
    """`scripts/slurm/train.sbatch` as SLURM runs it, with an `srun` that starts 2 tasks on this
    machine: Lightning's SLURM environment sets the ranks, stage 1 trains, one bundle is written."""
    fake = tmp_path / "bin" / "srun"
    fake.parent.mkdir()
    fake.write_text(FAKE_SRUN.format(python=sys.executable))
    fake.chmod(0o755)
    env = {
        **os.environ,
        **ENV,
        "PATH": f"{fake.parent}:{os.environ['PATH']}",
        "SLURM_NTASKS_PER_NODE": "2",
        "SLURM_NNODES": "1",
        "SLURM_SUBMIT_DIR": str(REPO_ROOT),
        "TRAINER": "cpu",
        "STRATEGY": "ddp",
        "PYTHON": sys.executable,
        "MASTER_PORT": str(free_port()),
    }
    res = subprocess.run(
        [
            "bash",
            "scripts/slurm/train.sbatch",
            "stage=1",
            "trainer.max_steps=2",
            "stage.batch_size=4",
            *QUIET,
            f"paths.root={tmp_path}",
            f"paths.cache_dir={tiny_cache}",
            "print_config=false",
        ],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = ok(res)
    assert "world size 2 (2 device(s) x 1 node(s))" in out
    assert sorted(p.name for p in (tmp_path / "bundles").iterdir()) == ["stage1"]
    assert bundle_meta(tmp_path, 1)["global_step"] == 2


def test_balanced_mix_under_ddp_one_source_a_batch_equal_turns(tiny_cache, tmp_path):
    """`dataset.mix=balanced` over three sources of 16, 8 and 4 samples on 2 ranks: every batch of
    every rank holds one source, and over a pass each source has as many batches."""
    import json as _json
    import shutil

    sources = []
    for name, n in (("synthetic_image", 16), ("synthetic_audio", 8), ("synthetic_video", 4)):
        src = tmp_path / "data" / name
        shutil.copytree(tiny_cache / "synthetic" / name, src)
        index = src / f"{name}.json"
        index.write_text(_json.dumps(_json.loads(index.read_text())[:n]))
        sources.append(
            "{name:" + name + ",modality:" + name.split("_")[1] + ",root:" + str(src) + ",weight:1}"
        )
    keys = tmp_path / "keys.txt"
    ok(
        train(
            tmp_path,
            tiny_cache,
            "stage=1",
            "dataset=nextgpt_mix",
            "dataset.mix=balanced",
            "dataset.num_workers=0",
            "dataset.sources=[" + ",".join(sources) + "]",
            *DDP,
            "stage.batch_size=2",
            *QUIET,
            RECORD,
            f"+callbacks.keys.path={keys}",
        )
    )
    per_pass = 3 * -(-16 // (2 * 2))  # 3 sources x the turns "image" needs: 4
    meta = bundle_meta(tmp_path, 1)
    assert meta["global_step"] == per_pass
    for rank in (0, 1):
        steps = recorded_batches(Path(f"{keys}.rank{rank}"))
        assert len(steps) == per_pass
        mods = [modalities(k) for k in steps.values()]
        assert all(len(m) == 1 for m in mods), mods
        assert Counter(next(iter(m)) for m in mods) == {"image": 4, "audio": 4, "video": 4}
