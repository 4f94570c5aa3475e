"""Any causal LM by `model.llm.path`: tiny random models of six families, built from their own
Hugging Face config classes, train two steps of every stage and answer through the KV cache."""
from __future__ import annotations

import pytest

from tests.cli import bundle_meta, train

pytestmark = pytest.mark.slow

# LoRA targets each family needs (Phi-3 fuses q/k/v; GPT-2 names its layers c_attn / c_proj)
TARGETS = {"phi3": ["model.lora.target_modules=[qkv_proj,o_proj]"], "gpt2": ["model.lora.target_modules=all-linear"]}


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    from nextgpt.tiny.families import FAMILIES, build_tiny_family

    root = tmp_path_factory.mktemp("families")
    return {name: build_tiny_family(name, root / name) for name in FAMILIES}


@pytest.mark.parametrize("family", ["llama3", "mistral", "qwen2", "gemma2", "phi3", "gpt2"])
def test_family_trains_every_stage_and_answers(family, families, tiny_cache, tmp_path):
    from nextgpt.generate import Generator

    res = train(tmp_path, tiny_cache, "-m", "stage=1,2,3", f"model.llm.path={families[family]}", *TARGETS.get(family, []),
                "trainer.max_steps=2", "logger=csv", "callbacks.generation_samples=null")
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    assert out.count("2 trained in this run") == 3
    for stage in (1, 2, 3):
        assert bundle_meta(tmp_path, stage)["global_step"] == 2
    gen = Generator(tmp_path / "bundles" / "stage3")
    with_cache = gen.chat("Show me an image of a red circle", max_new_tokens=6, decode=False, ignore_eos=True)
    without = gen.chat("Show me an image of a red circle", max_new_tokens=6, decode=False, ignore_eos=True, use_cache=False)
    assert with_cache.new_tokens == 6 and with_cache.text == without.text  # the family's cache gives the same answer
