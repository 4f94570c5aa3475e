"""Runs never collide, never silently do nothing, and never lose a good result: sweeps, reruns,
resumes, corrupt and changed data, bundles that do not fit, and the errors that name the fault."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nextgpt.model_spec import ModelSpec
from tests.cli import bundle_meta, ok, refused, shard_dir, train

pytestmark = pytest.mark.slow

QUIET = ["logger=csv", "callbacks.generation_samples=null", "stage.batch_size=4"]


def runs_of(root: Path, stage: int = 1) -> list[Path]:
    base = root / "checkpoints" / "tiny" / "synthetic" / f"stage{stage}"
    return sorted(p for p in base.iterdir() if (p / "run.json").is_file()) if base.is_dir() else []


def weights(bundle: Path) -> dict[str, torch.Tensor]:
    return load_file(str(bundle / "trainable.safetensors"))


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def image_source(tmp_path: Path, cache: Path, n: int | None = None) -> tuple[Path, str]:
    """A copy of the synthetic image source (first ``n`` entries) and the override that trains on it alone."""
    src = tmp_path / "data" / "synthetic_image"
    shutil.copytree(cache / "synthetic" / "synthetic_image", src)
    index = src / "synthetic_image.json"
    if n is not None:
        index.write_text(json.dumps(json.loads(index.read_text())[:n]))
    return src, f"dataset.sources=[{{name:synthetic_image,modality:image,root:{src}}}]"


def entries(src: Path) -> list[dict]:
    return json.loads((src / "synthetic_image.json").read_text())


# --- sweeps ---------------------------------------------------------------------------------------
def test_a_sweep_gives_every_job_its_own_run_and_bundle(tiny_cache, tmp_path):
    """`python train.py -m stage=1 stage.optim.lr=1e-4,4e-4 trainer.max_steps=2`: both jobs train 2 steps
    into bundles of their own, which differ."""
    ok(
        train(
            tmp_path, tiny_cache, "-m", "stage=1", "stage.optim.lr=1e-4,4e-4", "trainer.max_steps=2", *QUIET
        )
    )
    a, b = (tmp_path / "bundles" / f"stage.optim.lr={lr}" / "stage1" for lr in ("0.0001", "0.0004"))
    for bundle in (a, b):
        assert json.loads((bundle / "meta.json").read_text())["trained_steps"] == 2
    assert not same(weights(a), weights(b))
    assert len(runs_of(tmp_path)) == 2  # two runs, two checkpoint folders


def test_a_sweep_over_lr_and_stages_chains_within_each_lr(tiny_cache, tmp_path):
    ok(
        train(
            tmp_path,
            tiny_cache,
            "-m",
            "stage=1,2,3",
            "stage.optim.lr=1e-4,4e-4",
            "trainer.max_steps=1",
            *QUIET,
        )
    )
    for lr in ("0.0001", "0.0004"):
        chain = tmp_path / "bundles" / f"stage.optim.lr={lr}"
        for stage in (2, 3):
            meta = json.loads((chain / f"stage{stage}" / "meta.json").read_text())
            assert meta["init_from"] == str(chain / f"stage{stage - 1}")
    # W&B would group the jobs by sweep and name each by its swept values
    from omegaconf import OmegaConf

    saved = OmegaConf.load(tmp_path / "bundles" / "stage.optim.lr=0.0001" / "stage2" / "config.yaml")
    assert saved.run.tag == "stage.optim.lr=0.0001"


# --- reruns -----------------------------------------------------------------------------------------
def test_reruns_never_end_finished_having_trained_nothing(tiny_cache, tmp_path):
    ok(train(tmp_path, tiny_cache, "stage=1", "trainer.max_steps=2", *QUIET))
    first = weights(tmp_path / "bundles" / "stage1")
    # the same command again: the run is finished, nothing to train
    again = refused(
        train(tmp_path, tiny_cache, "stage=1", "trainer.max_steps=2", *QUIET),
        "this run already finished",
        "resume=false",
    )
    assert "finished at step" not in again
    assert same(weights(tmp_path / "bundles" / "stage1"), first)
    # more steps: another run, from scratch; the first bundle is kept as a version
    out = ok(train(tmp_path, tiny_cache, "stage=1", "trainer.max_steps=4", *QUIET))
    assert "this config differs in trainer.max_steps: 2 -> 4" in out
    assert bundle_meta(tmp_path, 1)["trained_steps"] == 4
    assert same(weights(tmp_path / "bundles" / "stage1.v1"), first)
    assert "kept the previous bundle" in out
    # or, by an explicit choice, continue the first run to 6 steps (its epoch ended with it: a new one starts)
    first_run = next(
        r for r in runs_of(tmp_path) if json.loads((r / "run.json").read_text())["global_step"] == 2
    )
    refused(
        train(tmp_path, tiny_cache, "stage=1", "trainer.max_steps=6", *QUIET, f"resume={first_run}"),
        "trained 0 steps",
    )  # trainer.max_epochs=1 was reached already: said, not "finished"
    out = ok(
        train(
            tmp_path,
            tiny_cache,
            "stage=1",
            "trainer.max_steps=6",
            "trainer.max_epochs=-1",
            *QUIET,
            f"resume={first_run}",
        )
    )
    assert "continuing from" in out and "trainer.max_steps: 2 -> 6" in out
    meta = bundle_meta(tmp_path, 1)
    assert (meta["global_step"], meta["trained_steps"]) == (6, 4)


def test_generated_data_is_in_the_key_of_the_run_that_wrote_it(tiny_cache, tmp_path):
    """The default data set is written by the run that first needs it. It is written before the run
    takes its key, so that key covers its files from the first start: a rerun (of a run killed while
    its data was new, or finished) is the same run, not a fresh one under another key."""
    fresh = [f"paths.synthetic_root={tmp_path / 'generated'}", "dataset.synthetic.num_per_modality=4"]
    ok(train(tmp_path, tiny_cache, "stage=1", "trainer.max_steps=1", *QUIET, *fresh))
    (run,) = runs_of(tmp_path)
    files = json.loads((run / "run.json").read_text())["identity"]["data_files"]
    assert set(files) == {"synthetic_image", "synthetic_audio", "synthetic_video"}
    assert all(f["json"] and f["media"]["files"] > 0 for f in files.values()), files
    refused(
        train(tmp_path, tiny_cache, "stage=1", "trainer.max_steps=1", *QUIET, *fresh),
        "this run already finished",
    )
    assert runs_of(tmp_path) == [run]


def test_a_killed_run_loses_at_most_the_time_checkpoint_interval(tiny_cache, tmp_path):
    """No step checkpoint before step 50, but the time-based one (every 0 s here) saved last.ckpt."""
    args = [
        "stage=1",
        "trainer.max_steps=5",
        *QUIET,
        "+callbacks.time_checkpoint.train_time_interval.seconds=0",
        "callbacks.time_checkpoint.train_time_interval.minutes=0",
    ]
    crashed = train(
        tmp_path,
        tiny_cache,
        *args,
        "+callbacks.crash._target_=tests.helpers.CrashAfter",
        "+callbacks.crash.step=3",
    )
    assert crashed.returncode != 0
    (run,) = runs_of(tmp_path)
    assert (run / "last.ckpt").is_file() and not list(run.glob("step*.ckpt"))
    out = ok(train(tmp_path, tiny_cache, *args))
    assert "resuming stage 1 from" in out
    assert bundle_meta(tmp_path, 1)["trained_steps"] < 5  # it did not start over


def test_a_truncated_checkpoint_is_named_and_an_older_one_used(tiny_cache, tmp_path):
    args = ["stage=1", "trainer.max_steps=4", *QUIET, "callbacks.model_checkpoint.every_n_train_steps=1"]
    assert (
        train(
            tmp_path,
            tiny_cache,
            *args,
            "+callbacks.crash._target_=tests.helpers.CrashAfter",
            "+callbacks.crash.step=3",
        ).returncode
        != 0
    )
    (run,) = runs_of(tmp_path)
    last = run / "last.ckpt"
    last.write_bytes(last.read_bytes()[:100])  # a kill while it was written
    out = ok(train(tmp_path, tiny_cache, *args))
    assert f"checkpoint {last} can not be resumed from" in out
    assert f"resuming stage 1 from {run / 'step000002.ckpt'}" in out  # the crash came before step 3's save
    assert bundle_meta(tmp_path, 1)["trained_steps"] == 2


# --- bad data -----------------------------------------------------------------------------------
def test_fully_corrupt_small_data_stops_and_the_good_bundle_survives(tiny_cache, tmp_path):
    src, only_images = image_source(tmp_path, tiny_cache, n=16)
    ok(train(tmp_path, tiny_cache, "stage=1", "trainer.max_steps=3", *QUIET, only_images))
    good = weights(tmp_path / "bundles" / "stage1")
    for e in entries(src):
        f = src / "images" / e["image_name"]
        f.write_bytes(f.read_bytes()[:30])
    out = refused(
        train(tmp_path, tiny_cache, "stage=1", "trainer.max_steps=-1", *QUIET, only_images),  # one epoch
        "dataset 'synthetic'",
        "16 of 16 samples were unusable",
        "undecodable media: 16",
    )
    assert same(weights(tmp_path / "bundles" / "stage1"), good)
    assert not (tmp_path / "bundles" / "stage1.v1").exists()
    assert "bundle written" not in out


def test_mostly_missing_files_stop_the_run(tiny_cache, tmp_path):
    src, only_images = image_source(tmp_path, tiny_cache)
    names = [e["image_name"] for e in entries(src)]
    for name in names[: 3 * len(names) // 4]:
        (src / "images" / name).unlink()
    refused(
        train(tmp_path, tiny_cache, "stage=1", "trainer.max_steps=8", *QUIET, only_images),
        "samples were unusable",
        "missing media file",
    )


def test_a_few_bad_samples_train_on_and_are_counted_exactly(tiny_cache, tmp_path):
    src, only_images = image_source(tmp_path, tiny_cache)
    bad = [e["image_name"] for e in entries(src)][:2]
    for name in bad:
        (src / "images" / name).write_bytes(b"not an image")
    n = len(entries(src))
    steps = -(-n // 4)  # one epoch: every sample read once
    out = ok(
        train(
            tmp_path,
            tiny_cache,
            "stage=1",
            f"trainer.max_steps={steps}",
            "dataset.max_skip_fraction=0.1",
            *QUIET,
            only_images,
            "trainer.log_every_n_steps=1",
        )
    )
    (run,) = runs_of(tmp_path)
    report = json.loads((run / "data_report.json").read_text())
    assert report["samples"] == n and report["skipped"] == 2
    assert report["skipped_by_reason"] == {"undecodable media": 2}
    assert f"{n} samples read, 2 skipped (undecodable media: 2)" in out
    metrics = (next((tmp_path / "logs").rglob("metrics.csv"))).read_text().splitlines()
    col = metrics[0].split(",").index("data/skipped")
    assert max(float(r.split(",")[col]) for r in metrics[1:] if r.split(",")[col]) == 2  # the running total


def test_missing_media_found_while_writing_shards_counts_toward_the_limit(tiny_cache, tmp_path):
    src, _ = image_source(tmp_path, tiny_cache)
    names = [e["image_name"] for e in entries(src)]
    for name in names[: len(names) // 2]:
        (src / "images" / name).unlink()
    res = train(
        tmp_path,
        tiny_cache,
        "stage=1",
        "dataset=cc3m",
        f"paths.data_root={tmp_path / 'data'}",
        "dataset.sources=[{name:synthetic_image,modality:image,root:" + str(src) + ",weight:1}]",
        "trainer.max_steps=2",
        "dataset.num_workers=0",
        *QUIET,
    )
    refused(res, "unusable before training", "missing media file (writing shards)")


def test_editing_the_source_json_rewrites_its_shards(tiny_cache, tmp_path):
    src, _ = image_source(tmp_path, tiny_cache)
    shard_args = [
        "dataset=cc3m",
        f"paths.data_root={tmp_path / 'data'}",
        "dataset.sources=[{name:synthetic_image,modality:image,root:" + str(src) + ",weight:1}]",
        "dataset.num_workers=0",
        *QUIET,
    ]
    ok(train(tmp_path, tiny_cache, "stage=1", "trainer.max_steps=1", *shard_args))
    shards = shard_dir(tmp_path, "synthetic_image")
    before = json.loads((shards / "synthetic_image-pairs.shards.json").read_text())
    fixed = [
        {**e, "caption": f"edited caption {i}"} for i, e in enumerate(entries(src)[:-4])
    ]  # 4 dropped, all changed
    (src / "synthetic_image.json").write_text(json.dumps(fixed))
    out = ok(train(tmp_path, tiny_cache, "stage=1", "trainer.max_steps=2", *shard_args))
    assert "changed since the shards" in out and "writing shards of its current data" in out
    assert f"removed the older shards {shards}" in out and not shards.exists()  # no run held them
    shards = shard_dir(tmp_path, "synthetic_image")  # the version of the edited data
    after = json.loads((shards / "synthetic_image-pairs.shards.json").read_text())
    assert after["total"] == before["total"] - 4
    import tarfile

    captions = []
    for shard in sorted(shards.glob("*.tar")):
        with tarfile.open(shard) as tar:
            captions += [
                json.loads(tar.extractfile(m).read())["caption"] for m in tar if m.name.endswith(".json")
            ]
    assert captions and all(c.startswith("edited caption") for c in captions)
    # with source_changed=error the run stops instead, naming the file
    (src / "synthetic_image.json").write_text(json.dumps(fixed[:-1]))
    refused(
        train(
            tmp_path,
            tiny_cache,
            "stage=1",
            "trainer.max_steps=3",
            *shard_args,
            "dataset.source_changed=error",
        ),
        str(src / "synthetic_image.json"),
        "changed since",
    )


# --- bundles that do not fit -------------------------------------------------------------------
def test_a_bundle_with_another_token_layout_of_equal_shapes_is_refused(tiny_cache, tmp_path):
    ok(train(tmp_path, tiny_cache, "stage=1", "trainer.max_steps=1", *QUIET))
    ok(train(tmp_path, tiny_cache, "stage=2", "trainer.max_steps=1", *QUIET))
    # 6 + 6 signal tokens: the same 12 rows as 4 + 8, other tokens on them
    six = ["model.modalities.image.num_signal_tokens=6", "model.modalities.audio.num_signal_tokens=6"]
    refused(
        train(tmp_path, tiny_cache, "stage=3", "trainer.max_steps=1", *QUIET, *six),
        "model.modalities.image.num_signal_tokens=6: the bundle",
        "trained with 4 image signal tokens ([IMG0] [IMG1] ...)",
        "asks for 6",
    )
    # and when loaded by hand, past the config check, the weights loader says the same

    from nextgpt.bundles import BundleError, load_bundle_weights
    from nextgpt.config import compose
    from nextgpt.model import build_nextgpt

    cfg = compose([f"paths.cache_dir={tiny_cache}", *six], output_dir=str(tmp_path))
    model, _, _ = build_nextgpt(ModelSpec.from_config(cfg.model))
    with pytest.raises(
        BundleError,
        match=r"another token layout: .*image signal tokens 4 \(\[IMG0\]..\[IMG3\].*vs 6 "
        r"\(\[IMG0\]..\[IMG5\]",
    ):
        load_bundle_weights(tmp_path / "bundles" / "stage2", model)


def test_a_moved_backbone_folder_is_found_again(tiny_cache, tmp_path):
    from nextgpt.bundles import BundleError
    from nextgpt.generate import Generator

    moved = tmp_path / "old_cache"
    shutil.copytree(tiny_cache / "tiny_backbones", moved / "tiny_backbones")
    ok(
        train(
            tmp_path,
            tiny_cache,
            "stage=1",
            "trainer.max_steps=1",
            *QUIET,
            f"paths.backbones={moved / 'tiny_backbones'}",
            "model.backbones=null",
        )
    )
    shutil.rmtree(moved)
    gen = Generator(tmp_path / "bundles" / "stage1", backbones=tiny_cache / "tiny_backbones")
    assert gen.stage == 1
    # an LLM outside both roots that is gone: the error names the key to fix
    elsewhere = tmp_path / "elsewhere" / "my_llm"
    shutil.copytree(tiny_cache / "tiny_backbones" / "llm", elsewhere)
    other = tmp_path / "other"
    ok(train(other, tiny_cache, "stage=1", "trainer.max_steps=1", *QUIET, f"model.llm.path={elsewhere}"))
    shutil.rmtree(elsewhere)
    with pytest.raises(BundleError, match=r"model.llm.path=.*my_llm' does not exist here.*--weights"):
        Generator(other / "bundles" / "stage1")


# --- errors that name the fault -----------------------------------------------------------------
def test_unclear_inputs_get_messages_that_name_them(tiny_cache, tmp_path):
    src, only_images = image_source(tmp_path, tiny_cache)
    (src / "synthetic_image.json").write_bytes('[{"caption": "caf\xe9"}]'.encode("latin-1"))
    refused(
        train(tmp_path, tiny_cache, "stage=1", *QUIET, only_images),
        str(src / "synthetic_image.json"),
        "not UTF-8",
    )
    refused(
        train(tmp_path, tiny_cache, "stage=1", "trainer.max_steps=abc", *QUIET), "trainer.max_steps='abc'"
    )
    not_lm = tmp_path / "not_an_llm"
    not_lm.mkdir()
    (not_lm / "config.json").write_text(json.dumps({"model_type": "clip_vision_model"}))
    refused(
        train(tmp_path, tiny_cache, "stage=1", f"model.llm.path={not_lm}", *QUIET),
        "model.llm.path=",
        "not a causal language model",
    )


def test_an_optuna_search_trains_each_trial_into_its_own_bundle(tiny_cache, tmp_path):
    """`python train.py hparams_search=stage_lr`: Optuna's trials never share a bundle or a run,
    and the best value it reports is the lowest final loss of its trials."""
    import re

    out = ok(
        train(
            tmp_path,
            tiny_cache,
            "hparams_search=stage_lr",
            "hydra.sweeper.n_trials=2",
            "trainer.max_steps=2",
            *QUIET,
        )
    )
    bundles = sorted(p.name for p in (tmp_path / "bundles").iterdir())
    assert len(bundles) == 2 and all(b.startswith("stage.optim.lr=") for b in bundles), bundles
    assert all((tmp_path / "bundles" / b / "stage1" / "trainable.safetensors").is_file() for b in bundles)
    assert len(runs_of(tmp_path)) == 2
    losses = [float(x) for x in re.findall(r"'train/loss': ([0-9.e-]+)", out)]
    best = float(re.search(r"Best value: ([0-9.e-]+)", out).group(1))
    assert len(losses) == 2 and best == pytest.approx(min(losses))
