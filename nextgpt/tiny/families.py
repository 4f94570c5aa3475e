"""Tiny random causal LMs of the families users bring (Llama 3, Mistral, Qwen 2.5, Gemma 2, Phi-3,
GPT-2), built from each family's own Hugging Face config class and saved with ``save_pretrained``,
so that ``model.llm.path=<folder>`` loads them through the same path as the real ones. They share
the tiny Llama tokenizer; the widths differ from the tiny Llama's, so nothing can lean on 64.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
)

from nextgpt.tiny.tokenizers import build_llm_tokenizer

HIDDEN = 48


def _common(tok) -> dict[str, Any]:
    return {
        "vocab_size": len(tok),
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }


def _llama3(tok):
    return LlamaConfig(
        hidden_size=HIDDEN,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 256,
        },
        **_common(tok),
    )


def _mistral(tok):
    return MistralConfig(
        hidden_size=HIDDEN,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        sliding_window=256,
        **_common(tok),
    )


def _qwen2(tok):
    return Qwen2Config(
        hidden_size=HIDDEN,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        **_common(tok),
    )


def _gemma2(tok):
    return Gemma2Config(
        hidden_size=HIDDEN,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=12,
        max_position_embeddings=1024,
        sliding_window=256,
        **_common(tok),
    )


def _phi3(tok):
    return Phi3Config(
        hidden_size=HIDDEN,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        original_max_position_embeddings=1024,
        **_common(tok),
    )


def _gpt2(tok):
    return GPT2Config(n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=1024, **_common(tok))


FAMILIES: dict[str, Callable] = {
    "llama3": _llama3,
    "mistral": _mistral,
    "qwen2": _qwen2,
    "gemma2": _gemma2,
    "phi3": _phi3,
    "gpt2": _gpt2,
}


def build_tiny_family(name: str, out: Path, *, seed: int = 0) -> Path:
    """A tiny random ``name`` causal LM (and the tiny Llama tokenizer) saved under ``out``."""
    if name not in FAMILIES:
        raise ValueError(f"unknown LLM family {name!r}; known: {sorted(FAMILIES)}")
    tok = build_llm_tokenizer(seed)
    config = FAMILIES[name](tok)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
