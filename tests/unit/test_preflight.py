"""Checks made from configs alone, before any weight loads, that name the key to change."""

from __future__ import annotations

import time

from transformers import GPT2Config

from nextgpt.model_spec import ModelSpec
from nextgpt.preflight import lora_target_errors
from tests.cli import train


def tiny_gpt2(path):
    GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=128, bos_token_id=0, eos_token_id=0
    ).save_pretrained(path)
    return path


def test_lora_targets_that_match_no_module_are_named(tmp_path):
    path = tiny_gpt2(tmp_path / "gpt2")
    (error,) = lora_target_errors(path, ["q_proj", "k_proj", "v_proj", "o_proj"])
    assert "model.lora.target_modules" in error and "gpt2 has no module named" in error
    assert "c_attn" in error  # what it does have
    assert lora_target_errors(path, ["c_attn"]) == [] and lora_target_errors(path, "all-linear") == []


def test_training_gpt2_with_llama_targets_is_refused_within_seconds(tiny_cache, tmp_path):
    path = tiny_gpt2(tmp_path / "gpt2")
    start = time.monotonic()
    res = train(tmp_path, tiny_cache, "stage=1", f"model.llm.path={path}", "logger=csv", timeout=120)
    took = time.monotonic() - start
    assert res.returncode == 2, res.stderr[-2000:]
    assert "model.lora.target_modules=['q_proj', 'k_proj', 'v_proj', 'o_proj']" in res.stderr
    assert "Loading weights" not in res.stderr  # refused before any weight loads
    print(f"refused in {took:.1f} s")


def test_chat_template_needs_one_in_the_tokenizer(tiny_config):
    from nextgpt.preflight import backbone_path_errors

    cfg = tiny_config("model.llm.template=chat")
    from pathlib import Path

    from nextgpt.tiny import build_all

    build_all(Path(cfg.paths.backbones))
    errors = backbone_path_errors(ModelSpec.from_config(cfg.model))
    assert any(e.startswith("model.llm.template='chat'") and "no chat template" in e for e in errors), errors
