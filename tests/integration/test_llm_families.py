"""Any causal LM by `model.llm.path`: tiny random models of six families, built from their own
Hugging Face config classes, train every stage, generate a signal group and its image, and answer
the same through the KV cache as without it.

Stages 1 and 2 train 2 steps; stage 3 trains one epoch of the synthetic image source (12 steps at
lr 1e-2): a random LLM needs that much to start emitting a signal group when asked for an image.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.cli import bundle_meta, train

pytestmark = pytest.mark.slow

# LoRA targets each family takes: by name (Phi-3 fuses q/k/v), derived from the architecture
# (GPT-2 names its attention layers c_attn / c_proj), every linear layer (Gemma 2); the rest
# use the default [q_proj, k_proj, v_proj, o_proj]
TARGETS = {
    "phi3": ["model.lora.target_modules=[qkv_proj,o_proj]"],
    "gpt2": ["model.lora.target_modules=attention"],
    "gemma2": ["model.lora.target_modules=all-linear"],
}
STAGE3_STEPS = 12
PER_STAGE = [
    "+fit.steps.1=2",
    "+fit.steps.2=2",
    f"+fit.steps.3={STAGE3_STEPS}",
    "+fit.lr.1=5e-4",
    "+fit.lr.2=5e-4",
    "+fit.lr.3=1e-2",
    "trainer.max_steps='${nextgpt.per_stage:${fit.steps},${stage.number}}'",
    "stage.optim.lr='${nextgpt.per_stage:${fit.lr},${stage.number}}'",
    "trainer.max_epochs=-1",
    "dataset.sources=[{name:synthetic_image,modality:image,root:${paths.synthetic_root}/synthetic_image}]",
]


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    from nextgpt.tiny.families import FAMILIES, build_tiny_family

    root = tmp_path_factory.mktemp("families")
    return {name: build_tiny_family(name, root / name) for name in FAMILIES}


@pytest.mark.parametrize("family", ["llama3", "mistral", "qwen2", "gemma2", "phi3", "gpt2"])
def test_family_trains_every_stage_and_answers(family, families, tiny_cache, tmp_path):
    from nextgpt.generate import Generator

    res = train(
        tmp_path,
        tiny_cache,
        "-m",
        "stage=1,2,3",
        f"model.llm.path={families[family]}",
        *TARGETS.get(family, []),
        *PER_STAGE,
        "logger=csv",
        "callbacks.generation_samples=null",
    )
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    assert out.count("(2 trained in this run)") == 2 and f"({STAGE3_STEPS} trained in this run)" in out, out[
        -3000:
    ]
    for stage, steps in ((1, 2), (2, 2), (3, STAGE3_STEPS)):
        assert bundle_meta(tmp_path, stage)["global_step"] == steps
    gen = Generator(tmp_path / "bundles" / "stage3")
    with_cache = gen.chat("Show me an image of a red circle", max_new_tokens=6, decode=False, ignore_eos=True)
    without = gen.chat(
        "Show me an image of a red circle", max_new_tokens=6, decode=False, ignore_eos=True, use_cache=False
    )
    # the family's cache gives the same answer (a signal group, forced whole, may run past 6 tokens)
    assert with_cache.new_tokens >= 6 and (with_cache.text, with_cache.signal_groups) == (
        without.text,
        without.signal_groups,
    )
    # a request from the generation set: the answer holds an image signal group, decoded to an image
    request = json.loads(
        (tiny_cache / "synthetic" / "synthetic_image" / "synthetic_image_generation.json").read_text()
    )[0]
    res = gen.chat(request["conversations"][0]["value"], max_new_tokens=8)
    assert "image" in res.signal_groups, res.text
    size = dict(gen.decoder("image").generate)
    image = res.arrays["image"][0]
    assert image.shape == (size["height"], size["width"], 3) and np.isfinite(image).all()
