"""The world LLM's pre-training text: answers that depend on their context, in request wordings that no
stage trains on, and held-out wordings that appear nowhere in training."""

from __future__ import annotations

import random

from datamodules.nextgpt_layout import GENERATE_REQUESTS
from nextgpt.world.attributes import caption_attributes
from nextgpt.world.llm import HELD_OUT_REQUESTS, PRETRAINING_REQUESTS, world_turns
from nextgpt.world.synthetic import GENERATION_REQUESTS


def test_answers_restate_or_answer_from_their_context():
    turns = world_turns(random.Random(0), 400)
    restated = [t for t in turns if "It is " in t]
    asked = [t for t in turns if "shows" in t.split("\n")[0]]
    assert len(restated) + len(asked) == 400 and 180 < len(restated) < 300
    for t in restated[:50]:
        human, answer = t.split("\n")[0], t.split("\n")[1]
        said = answer.split("It is ", 1)[1].rstrip(".")
        assert said in human  # the answer names exactly what was asked for
    for t in asked[:50]:
        human, answer = t.split("\n")[0], t.split("\n")[1]
        modality = human.split("The ", 1)[1].split(" ")[0]
        value = answer.removeprefix("### Assistant: ").rstrip(".")
        caption = human.split(" shows ", 1)[1].rsplit(". ", 1)[0]
        assert value in caption_attributes(caption, modality).values()


def test_wordings_are_apart():
    stems = {w.split("{")[0].strip().lower() for w in GENERATION_REQUESTS}
    assert not stems & {w.split("{")[0].strip().lower() for w in PRETRAINING_REQUESTS}
    assert not set(HELD_OUT_REQUESTS) & (set(PRETRAINING_REQUESTS) | set(GENERATION_REQUESTS))
    stage_stems = stems | {
        w.split("{")[0].strip().lower() for w in GENERATE_REQUESTS
    }  # instruction and pair wordings
    assert not stage_stems & {w.split("{")[0].strip().lower() for w in HELD_OUT_REQUESTS}
    joined = "\n".join(world_turns(random.Random(1), 500))
    for w in HELD_OUT_REQUESTS:
        assert w.split("{")[0].strip() not in joined


def test_the_real_weights_path_never_imports_the_world():
    import subprocess
    import sys

    code = (
        "import sys, nextgpt.cli.train, nextgpt.cli.evaluate, nextgpt.cli.cache, nextgpt.generate, nextgpt.serve; "
        "print(sorted(m for m in sys.modules if m.startswith('nextgpt.world')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
