"""Learning regression: a short world run learns what it should, and step for step as it did when
the golden losses were stored (as Megatron-LM's functional tests). A change that breaks learning (the
alignment loss, the data, the trainable set, the optimizer) moves the losses off the golden track;
one that breaks function fails the scorecard checks.

The run: the small world build (``model.backbones.small=true``, shared with the build test), 64 world
items per modality, stage 1 (240 steps) then stage 2 (160 steps), seed 0, one process; then
``evaluate.py -m`` on each bundle with held-out items, asked in words no training text holds:
stage 1 names the colour of images and videos above chance, stage 2 answers with the asked
modality's signal tokens above chance.

Not here: that the stage-2 projector says *which* caption it was asked for (the demo's 1,800 steps;
``benchmarks/world_probe.py`` and the README's scorecard measure it).

Golden values live in ``tests/golden/learning.json``; ``NEXTGPT_UPDATE_GOLDEN=1`` rewrites them from
a run (say why in the commit). The tolerance covers float differences between CPUs, not a change of
behaviour.
"""

from __future__ import annotations

import csv
import json
import os
import random
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.cli import ENV, ok, run_python, train
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow

GOLDEN = Path(__file__).parent.parent / "golden" / "learning.json"
STEPS = {1: 240, 2: 160}
# Two checks per loss term against the golden track. Stage 2's trajectory is chaotic in the last
# float bits: one run under xdist in a clean-clone CI differed from the golden by a median 0.16 %
# per step (90th percentile 0.64 %, max 2.3 %), a serial rerun by <= 2e-4. Alignment against the
# neighbouring sample's caption (a pairing bug) moved it by a median 0.62 % and 0.76 % in two runs.
RTOL = 0.05  # every step: a gross change (targets zeroed: up to 94 %) fails here
MEDIAN_RTOL = 0.004  # the median step: a subtle one (the pairing bug) fails here
SCORED = 24  # held-out items per task
# Wordings that no training text holds (checked below): stage 1 is asked to caption, stage 2 to
# generate, in words of neither the stage data nor the world LLM's pre-training.
CAPTION_WORDING = "In a few words, say what this ${task.modality} holds."
REQUEST_WORDING = "Send me the ${task.modality} of {caption}, would you?"


def settings(work: Path, world: Path) -> list[str]:
    return [
        "model=world",
        "model.backbones.small=true",
        f"paths.world_backbones={world}",
        "dataset=world",
        "dataset.synthetic.num_per_modality=64",
        f"dataset.synthetic.root={work / 'world_data'}",
        "dataset.num_workers=0",
        "stage.batch_size=8",
        "stage.optim.lr=1e-2",
        "seed=0",
        "logger=csv",
        "trainer.log_every_n_steps=1",
        "trainer.max_epochs=1000",
    ]


def step_losses(root: Path, stage: int) -> dict[str, list[float]]:
    """train/<term> per optimizer step of the stage's run, from its CSV log."""
    (path,) = (root / "runs" / f"stage{stage}").rglob("metrics.csv")
    with open(path) as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    return {
        k.removeprefix("train/"): [float(r[k]) for r in rows]
        for k in rows[0]
        if k.startswith("train/") and rows[0][k]
    }


def scorecard(root: Path, cache: Path, stage: int, tasks: list[str], *overrides: str) -> dict[str, dict]:
    """``python evaluate.py -m task=...`` on the stage's bundle: each task's metrics."""
    out = root / f"eval{stage}"
    res = run_python(
        [
            sys.executable,
            "evaluate.py",
            "-m",
            f"task={','.join(tasks)}",
            f"checkpoint={root / 'bundles' / f'stage{stage}'}",
            f"limit={SCORED}",
            f"paths.cache_dir={cache}",
            f"hydra.sweep.dir={out}",
            "hydra.sweep.subdir=${task.name}",
            *overrides,
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **ENV},
    )
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    return {t: json.loads((out / t / "results.json").read_text())["metrics"] for t in tasks}


@pytest.fixture(scope="module")
def world_run(world_small, tiny_cache, tmp_path_factory):
    root = tmp_path_factory.mktemp("learning")
    for stage, steps in STEPS.items():
        ok(
            train(
                root,
                tiny_cache,
                f"stage={stage}",
                f"trainer.max_steps={steps}",
                *settings(root, world_small),
                f"hydra.run.dir={root / 'runs' / f'stage{stage}'}",
                timeout=900,
            )
        )
    return root, {stage: step_losses(root, stage) for stage in STEPS}


def test_losses_follow_the_golden_track(world_run):
    _, losses = world_run
    if os.environ.get("NEXTGPT_UPDATE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps({str(s): v for s, v in losses.items()}, indent=1) + "\n")
        pytest.skip(f"golden losses rewritten: {GOLDEN}")
    golden = {int(s): v for s, v in json.loads(GOLDEN.read_text()).items()}
    for stage, terms in golden.items():
        for term, want in terms.items():
            got = losses[stage][term]
            assert len(got) == len(want), (stage, term, len(got), len(want))
            np.testing.assert_allclose(got, want, rtol=RTOL, atol=1e-4, err_msg=f"stage {stage} train/{term}")
            drift = float(np.median(np.abs(np.subtract(got, want)) / np.maximum(np.abs(want), 1e-4)))
            assert drift <= MEDIAN_RTOL, (
                f"stage {stage} train/{term}: median relative drift {drift:.4f} > {MEDIAN_RTOL}"
            )
    first, last = losses[2]["align"][:4], losses[2]["align"][-4:]
    assert np.mean(last) < 0.5 * np.mean(first), losses[2][
        "align"
    ]  # and it learns: the alignment halves at least


def test_the_new_wordings_are_in_no_training_text():
    from datamodules.nextgpt_layout import CAPTION_INSTRUCTIONS, GENERATE_REQUESTS
    from nextgpt.world.llm import PRETRAINING_REQUESTS, world_turns
    from nextgpt.world.synthetic import (
        AUDIO_COMPREHENSION_INSTRUCTIONS,
        COMPREHENSION_INSTRUCTIONS,
        GENERATION_REQUESTS,
    )

    trained = [
        *CAPTION_INSTRUCTIONS,
        *GENERATE_REQUESTS,
        *PRETRAINING_REQUESTS,
        *COMPREHENSION_INSTRUCTIONS,
        *AUDIO_COMPREHENSION_INSTRUCTIONS,
        *GENERATION_REQUESTS,
    ]
    stems = {w.split("{")[0].split(" ")[0].lower() for w in trained}
    pretraining = "\n".join(world_turns(random.Random(0), 2000))
    for wording in (CAPTION_WORDING, REQUEST_WORDING):
        assert wording.split(" ")[0].lower() not in stems, wording
        assert wording.split("$")[0] not in pretraining


def test_stage1_captions_held_out_media_above_chance_when_asked_in_new_words(world_run, tiny_cache):
    """Colour is what 240 steps of the small world learn to name (held-out figures at this size:
    image 0.33, video 0.46, chance 0.14; audio captions need the demo's length, see the README)."""
    root, _ = world_run
    cards = scorecard(root, tiny_cache, 1, ["world_i2t", "world_v2t"], f"++task.prompt='{CAPTION_WORDING}'")
    colour = [cards[t]["world_attributes"]["by_attribute"]["colour"] for t in cards]
    assert np.mean(colour) > 1 / 7 + 0.15, cards
    assert all(c["trigger_rate"]["value"] == 1.0 for c in cards.values()), (
        cards
    )  # a caption, no signal tokens


def test_stage2_answers_new_requests_with_the_asked_modality(world_run, tiny_cache):
    """Exactly the asked modality's signal group, for requests worded as no training text words them
    (at this size: image 0.62, audio 0.29, video 1.00; chance 1/3)."""
    root, _ = world_run
    cards = scorecard(
        root,
        tiny_cache,
        2,
        ["world_t2i", "world_t2a", "world_t2v"],
        f"++task.prompt='{REQUEST_WORDING}'",
        "++task.generation.decode=false",
        "++task.metrics=[trigger_rate]",
    )
    rates = {t: c["trigger_rate"]["value"] for t, c in cards.items()}
    assert np.mean(list(rates.values())) > 1 / 3 + 0.15, cards
