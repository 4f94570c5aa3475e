"""`python train.py -m experiment=nextgpt_legacy model=tiny stage=1,2,3`: the original's recipe
trains each stage, chained through the bundles, with one data set per batch."""
from __future__ import annotations

import pytest

from tests.cli import bundle_meta, recorded_batches, train

pytestmark = pytest.mark.slow


def test_legacy_recipe_trains_two_steps_per_stage(tiny_cache, tmp_path):
    keys = tmp_path / "keys"
    res = train(tmp_path, tiny_cache, "-m", "experiment=nextgpt_legacy", "model=tiny", "stage=1,2,3",
                "trainer.max_steps=2", "logger=csv", "callbacks.generation_samples=null",
                "+callbacks.keys._target_=tests.helpers.RecordKeys", f"+callbacks.keys.path={keys}" + "${stage.number}")
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    for stage in (1, 2, 3):
        assert bundle_meta(tmp_path, stage)["stage"] == stage
        batches = recorded_batches(tmp_path / f"keys{stage}")
        assert sorted(batches) == [0, 1], batches
        # the balanced mix: each batch holds one synthetic source (img_/aud_/vid_ keys), in turn
        prefixes = [{k.split("_")[0] for k in b} for _, b in sorted(batches.items())]
        assert all(len(p) == 1 for p in prefixes) and prefixes[0] != prefixes[1], prefixes
    assert out.count("2 trained in this run") == 3, out[-3000:]


def test_a_failed_stage_stops_the_sweep_with_its_own_error(tiny_cache, tmp_path):
    """Stage 1 fails: the sweep stops there and says why (it used to go on to stage 2, whose missing
    stage-1 bundle ended the process before Hydra reported stage 1's error)."""
    res = train(tmp_path, tiny_cache, "-m", "stage=1,2", "trainer.max_steps=1", "logger=csv",
                "callbacks.generation_samples=null", "stage.optim.scheduler.warmup_type=bogus")
    out = res.stdout + res.stderr
    assert res.returncode != 0
    assert "warmup_type must be one of" in out and "starts from the bundle" not in out, out[-3000:]
