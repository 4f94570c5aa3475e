"""ImageBind feature caches of shard sources: built by `python -m nextgpt.cache` (one process or
several, completing a partial cache), read by stage 1 from shards without opening the media of
cached items, and the same loss as decoding them."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from nextgpt.model_spec import ModelSpec
from tests.cli import ENV, free_port, shard_dir, train
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow

QUIET = ["logger=csv", "callbacks.generation_samples=null", "stage.batch_size=4", "dataset.num_workers=0"]


def shard_source(tmp_path: Path, cache: Path) -> tuple[Path, list[str]]:
    """A copy of the synthetic image source and the overrides that read it as shards (dataset=cc3m)."""
    src = tmp_path / "data" / "synthetic_image"
    shutil.copytree(cache / "synthetic" / "synthetic_image", src)
    return src, [
        "dataset=cc3m",
        "dataset.sources=[{name:synthetic_image,modality:image,root:" + str(src) + ",weight:1}]",
    ]


def cache_cli(
    root: Path, cache: Path, *args: str, env: dict | None = None, torchrun: int = 0
) -> subprocess.CompletedProcess:
    launch = (
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            str(torchrun),
            f"--master-port={free_port()}",
            "-m",
            "nextgpt.cache",
        ]
        if torchrun
        else [sys.executable, "-m", "nextgpt.cache"]
    )
    return subprocess.run(
        [*launch, *args, f"paths.root={root}", f"paths.cache_dir={cache}"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **ENV, **(env or {})},
    )


def store_dir(root: Path) -> Path:
    (found,) = (shard_dir(root, "synthetic_image") / ".nextgpt_cache").glob("imagebind_image_pairs-*")
    return found


def store_keys(directory: Path) -> list[str]:
    return [k for f in sorted(directory.glob("part-*.keys.json")) for k in json.loads(f.read_text())]


def report(root: Path) -> dict:
    (found,) = (root / "checkpoints").rglob("data_report.json")
    return json.loads(found.read_text())


def spoil_media(shards: Path) -> int:
    """Overwrite every image member of the shards with bytes no decoder reads (same names)."""
    spoiled = 0
    for shard in sorted(shards.glob("*.tar")):
        with tarfile.open(shard) as tar:
            members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
        with tarfile.open(shard, "w") as tar:
            for m, data in members:
                if m.name.endswith((".png", ".jpg")):
                    data, spoiled = b"not an image any more", spoiled + 1
                m.size = len(data)
                tar.addfile(m, io.BytesIO(data))
    return spoiled


def test_stage1_from_shards_reads_cached_features_and_never_the_media(tiny_cache, tmp_path):
    src, shards_args = shard_source(tmp_path, tiny_cache)
    res = cache_cli(tmp_path, tiny_cache, *shards_args)
    assert res.returncode == 0, res.stderr[-3000:]
    n = len(json.loads((src / "synthetic_image.json").read_text()))
    assert len(store_keys(store_dir(tmp_path))) == n
    (text,) = (shard_dir(tmp_path, "synthetic_image") / ".nextgpt_cache").glob("text_image-*")
    assert len(set(store_keys(text))) == len(
        {e["caption"] for e in json.loads((src / "synthetic_image.json").read_text())}
    )
    assert spoil_media(shard_dir(tmp_path, "synthetic_image")) == n
    res = train(tmp_path, tiny_cache, "stage=1", *shards_args, "trainer.max_steps=3", *QUIET)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    assert (
        f"using ImageBind feature cache {store_dir(tmp_path)} for 'synthetic_image': {n} items cached" in out
    )
    got = report(tmp_path)
    assert (got["skipped"], got["media_from_cache"], got["media_decoded"]) == (0, 12, 0)
    assert "12 from the feature cache, 0 decoded" in out
    # without the cache the same shards are unreadable: the cache is what kept the media closed
    nocache = train(
        tmp_path / "nocache",
        tiny_cache,
        "stage=1",
        *shards_args,
        "trainer.max_steps=3",
        *QUIET,
        "dataset.feature_cache=false",
        f"paths.shards={tmp_path / 'data' / 'shards'}",
    )
    assert nocache.returncode == 2 and "undecodable media" in nocache.stdout + nocache.stderr, nocache.stderr[
        -2000:
    ]


def test_stage2_targets_are_read_from_the_caption_cache_beside_the_shards(tiny_cache, tmp_path):
    """The shard data module attaches the caption cache that `python -m nextgpt.cache` wrote beside
    its shards to the stage's alignment targets: a batch's captions are read from it, none encoded
    again and nothing spilled elsewhere."""
    from datamodules.shard_datamodule import ShardDataModule
    from nextgpt.cache.captions import CaptionSources, CaptionTargets
    from nextgpt.config import compose
    from nextgpt.model import load_conditioners

    src, shards_args = shard_source(tmp_path, tiny_cache)
    res = cache_cli(tmp_path, tiny_cache, *shards_args)
    assert res.returncode == 0, res.stderr[-3000:]
    model = ModelSpec.from_config(compose([f"paths.cache_dir={tiny_cache}"], output_dir=str(tmp_path)).model)
    dm = ShardDataModule(
        [
            {
                "name": "synthetic_image",
                "modality": "image",
                "shards": str(shard_dir(tmp_path, "synthetic_image")),
            }
        ],
        "generate",
        model,
        batch_size=4,
        cache_fallback=str(tmp_path / "fallback"),
    )
    assert isinstance(dm, CaptionSources)
    targets = CaptionTargets(load_conditioners(model), tmp_path / "spill")
    dm.open_caption_stores(targets, device="cpu")
    captions = sorted({e["caption"] for e in json.loads((src / "synthetic_image.json").read_text())})
    got = targets.get({"image": captions}, "cpu")
    assert got["image"].shape[0] == len(captions) and targets.computed == 0
    assert not (tmp_path / "spill").exists()


def test_cached_and_decoded_features_give_the_same_loss(tiny_cache, tmp_path):
    """On a fixed batch (the stream unshuffled), within the fp16 rounding of the cache."""
    from omegaconf import OmegaConf

    from datamodules.caches import compute_shard_media
    from datamodules.prepare import prepare_nextgpt
    from datamodules.shard_datamodule import ShardDataModule
    from nextgpt.cache.encode import shard_media_store
    from nextgpt.config import compose
    from nextgpt.model import load_encoder
    from nextgpt.stages import STAGES

    src, _ = shard_source(tmp_path, tiny_cache)
    shards = tmp_path / "shards"
    prepare_nextgpt(src, "synthetic_image", "image", shards, sets=["pairs"])
    cfg = compose(
        [f"paths.cache_dir={tiny_cache}", "model.output_projector.dropout=0"], output_dir=str(tmp_path)
    )
    model_cfg = ModelSpec.from_config(cfg.model)
    store = shard_media_store(shards, "image", "pairs", model_cfg.encoder, tmp_path / "fallback")
    paths = sorted(shards.glob("*.tar"))
    assert compute_shard_media(store, paths, "image", load_encoder(model_cfg.encoder), batch_size=8) == 24
    module = STAGES[1](
        model=model_cfg,
        optim=OmegaConf.to_container(cfg.stage.optim, resolve=True),
        loss=OmegaConf.to_container(cfg.stage.loss),
    )
    module.configure_model()
    module.model.eval()
    losses, kinds = {}, {}
    for cached in (True, False):
        dm = ShardDataModule(
            [{"name": "synthetic_image", "modality": "image", "shards": str(shards)}],
            "caption",
            model_cfg,
            batch_size=8,
            shuffle=False,
            feature_cache=cached,
            cache_fallback=str(tmp_path / "fallback"),
        )
        dm.setup("fit")
        batch = next(iter(dm.train_dataloader()))
        batch = dm.on_before_batch_transfer(batch, 0)
        kinds[cached] = (batch["media_from_cache"], batch["media_decoded"])
        with torch.no_grad():
            losses[cached] = float(module.compute_loss(batch)["loss"])
    assert kinds == {True: (8, 0), False: (0, 8)}
    assert losses[True] == pytest.approx(losses[False], rel=2e-3, abs=2e-3)


@pytest.mark.distributed
def test_two_processes_complete_a_partial_cache_and_ddp_reads_it(tiny_cache, tmp_path):
    src, shards_args = shard_source(tmp_path, tiny_cache)
    n = len(json.loads((src / "synthetic_image.json").read_text()))
    half = cache_cli(
        tmp_path, tiny_cache, *shards_args, env={"RANK": "0", "WORLD_SIZE": "2"}
    )  # rank 0's share only
    assert half.returncode == 0, half.stderr[-3000:]
    partial = store_keys(store_dir(tmp_path))
    assert 0 < len(partial) < n
    # training under DDP with the partial cache: cached items read, the rest decoded, nothing raced
    out = train(
        tmp_path / "ddp",
        tiny_cache,
        "stage=1",
        *shards_args,
        "strategy=ddp",
        "trainer.devices=2",
        "trainer.accelerator=cpu",
        "trainer.max_steps=3",
        *QUIET,
        f"paths.shards={tmp_path / 'data' / 'shards'}",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    got = report(tmp_path / "ddp")
    assert got["media_from_cache"] > 0 and got["media_decoded"] > 0 and got["skipped"] == 0
    assert store_keys(store_dir(tmp_path)) == partial  # training never writes the media cache
    res = cache_cli(tmp_path, tiny_cache, *shards_args, torchrun=2)
    assert res.returncode == 0, res.stderr[-3000:]
    keys = store_keys(store_dir(tmp_path))
    assert len(keys) == len(set(keys)) == n  # every item once: the pass resumed, the ranks split the rest
    writers = {p.name.rsplit("-", 1)[0] for p in store_dir(tmp_path).glob("part-*.npy")}
    assert len(writers) == 2  # the first pass (rank 0's share), then rank 1 of the second: each its own parts
