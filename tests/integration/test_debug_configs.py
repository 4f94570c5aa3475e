"""The debug/ configs do what they say on a real run: overfit one batch (the same samples every
step, the loss going down), short epochs (limit), the profiler's report."""

from __future__ import annotations

import pytest

from tests.cli import ok, recorded_batches, train

pytestmark = pytest.mark.slow

QUIET = ["callbacks.generation_samples=null", "+callbacks.keys._target_=tests.helpers.RecordKeys"]


def test_overfit_trains_on_one_batch_again_and_again(tiny_cache, tmp_path):
    keys = tmp_path / "keys.txt"
    out = ok(
        train(
            tmp_path,
            tiny_cache,
            "debug=overfit",
            "trainer.max_steps=4",
            *QUIET,
            f"+callbacks.keys.path={keys}",
        )
    )
    batches = recorded_batches(keys)
    assert sorted(batches) == [0, 1, 2, 3] and len({tuple(b) for b in batches.values()}) == 1, batches
    assert "4 trained in this run" in out


def test_limit_makes_short_epochs(tiny_cache, tmp_path):
    keys = tmp_path / "keys.txt"
    out = ok(train(tmp_path, tiny_cache, "debug=limit", *QUIET, f"+callbacks.keys.path={keys}"))
    assert len(recorded_batches(keys)) == 6 and "6 trained in this run" in out  # 2 epochs x 3 batches


def test_profiler_prints_where_the_time_goes(tiny_cache, tmp_path):
    out = ok(
        train(
            tmp_path, tiny_cache, "debug=profiler", "trainer.max_steps=2", "callbacks.generation_samples=null"
        )
    )
    assert "FIT Profiler Report" in out and "run_training_batch" in out
