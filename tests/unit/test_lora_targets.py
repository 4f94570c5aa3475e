"""LoRA targets derived from the architecture (``model.lora.target_modules=attention``): every
linear layer inside the attention blocks of each family, and nothing else, wrapped by peft."""

from __future__ import annotations

import pytest
import torch

from nextgpt.lora import attention_pattern, describe, resolve_targets

EXPECTED = {  # the attention layers of one decoder layer, as each family names them
    "llama3": ["self_attn.k_proj", "self_attn.o_proj", "self_attn.q_proj", "self_attn.v_proj"],
    "mistral": ["self_attn.k_proj", "self_attn.o_proj", "self_attn.q_proj", "self_attn.v_proj"],
    "qwen2": ["self_attn.k_proj", "self_attn.o_proj", "self_attn.q_proj", "self_attn.v_proj"],
    "gemma2": ["self_attn.k_proj", "self_attn.o_proj", "self_attn.q_proj", "self_attn.v_proj"],
    "phi3": ["self_attn.o_proj", "self_attn.qkv_proj"],
    "gpt2": ["attn.c_attn", "attn.c_proj"],  # not the MLP's own c_proj
}


def family_llm(name: str, device: str = "meta"):
    from transformers import AutoModelForCausalLM

    from nextgpt.tiny.families import FAMILIES
    from nextgpt.tiny.tokenizers import build_llm_tokenizer

    with torch.device(device):
        return AutoModelForCausalLM.from_config(FAMILIES[name](build_llm_tokenizer(0)))


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_attention_targets_are_the_attention_linears_of_every_layer(family):
    llm = family_llm(family)
    layers = llm.config.num_hidden_layers
    chosen = describe(llm, "attention")
    assert len(chosen) == layers * len(EXPECTED[family])
    per_layer = sorted(
        {n.split(".", 3)[-1] for n in chosen}
    )  # "model.layers.0.self_attn.q_proj" -> "self_attn.q_proj"
    assert per_layer == EXPECTED[family], chosen
    assert not any("mlp" in n for n in chosen)


def test_peft_wraps_exactly_the_derived_modules():
    from peft import LoraConfig, get_peft_model

    llm = family_llm("gpt2", device="cpu")
    expected = describe(llm, "attention")
    peft_model = get_peft_model(
        llm, LoraConfig(r=2, lora_alpha=4, target_modules=resolve_targets(llm, "attention"))
    )
    wrapped = sorted(
        {
            n.split(".lora_")[0].removeprefix("base_model.model.")
            for n, _ in peft_model.named_parameters()
            if ".lora_" in n
        }
    )
    assert wrapped == sorted(expected)
    assert "transformer.h.0.mlp.c_proj" not in wrapped


def test_a_model_without_attention_blocks_is_refused_by_name():
    with pytest.raises(
        ValueError, match="model.lora.target_modules='attention': Sequential has no attention block"
    ):
        attention_pattern(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_names_and_all_linear_pass_through():
    llm = family_llm("phi3")
    assert resolve_targets(llm, ["qkv_proj"]) == ["qkv_proj"]
    assert resolve_targets(llm, "all-linear") == "all-linear"
    assert "lm_head" not in describe(llm, "all-linear")
    assert describe(llm, ["qkv_proj"]) == [
        "model.layers.0.self_attn.qkv_proj",
        "model.layers.1.self_attn.qkv_proj",
    ]


def test_preflight_accepts_attention_for_gpt2(tmp_path):
    from nextgpt.preflight import lora_target_errors
    from nextgpt.tiny.families import build_tiny_family

    path = build_tiny_family("gpt2", tmp_path / "gpt2")
    assert lora_target_errors(path, "attention") == []
    [error] = lora_target_errors(path, ["q_proj"])
    assert "all-linear or attention" in error
