"""evaluate.py scores a stage bundle on held-out data and writes eval.json."""

from __future__ import annotations

import json
import os
import sys

import pytest
from omegaconf import OmegaConf

from nextgpt.bundles import save_bundle
from nextgpt.stages import Stage2DecodingAlignment
from tests.cli import run_python
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow


def test_evaluate_stage2_bundle(tiny_cache, tmp_path):
    from nextgpt.config import compose

    cfg = compose(
        [f"paths.root={tmp_path}", f"paths.cache_dir={tiny_cache}", "stage=2"], output_dir=str(tmp_path)
    )
    resolved = OmegaConf.to_container(cfg, resolve=True)
    module = Stage2DecodingAlignment(
        model=resolved["model"], optim=resolved["stage"]["optim"], loss=resolved["stage"]["loss"]
    )
    module.configure_model()
    bundle = save_bundle(tmp_path / "b2", module.model, resolved, {"stage": 2})
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    res = run_python(
        [
            sys.executable,
            "evaluate.py",
            f"checkpoint={bundle}",
            "limit=10",
            f"paths.root={tmp_path}",
            f"paths.cache_dir={tiny_cache}",
            f"hydra.run.dir={tmp_path / 'eval'}",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert (
        result["task"] == "heldout_loss"
        and result["objective"] == "generate"
        and result["samples"] == 10
        and result["skipped"] == 0
    )
    assert (
        result["ce"] > 0
        and result["align"] > 0
        and result["loss"] == pytest.approx(result["ce"] + result["align"])
    )


@pytest.mark.parametrize(
    "arg,needle", [("checkpoint={tmp}/none", "{tmp}/none"), ("task=t9_nothing", "t9_nothing")]
)
def test_evaluate_names_what_is_wrong(tmp_path, arg, needle):
    res = run_python(
        [sys.executable, "evaluate.py", arg.format(tmp=tmp_path), f"paths.root={tmp_path}"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2 and needle.format(tmp=tmp_path) in res.stderr
    if arg.startswith("task="):  # the error lists what there is
        assert all(t in res.stderr for t in ("heldout_loss", "t2i_coco", "a2t_audiocaps", "v2t_msrvtt"))


def test_benchmark_task_names_a_missing_benchmark_folder(tmp_path):
    res = run_python(
        [
            sys.executable,
            "evaluate.py",
            "task=i2t_coco",
            f"paths.data_root={tmp_path / 'bench'}",
            f"paths.root={tmp_path}",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2 and f"{tmp_path / 'bench'}/coco" in res.stderr
