"""Which LLM layers get LoRA adapters (``model.lora.target_modules``).

Three ways to say it:

- a list of module names, matched by peft by their last components (``[q_proj, v_proj]``);
- ``all-linear``: peft's own, every linear layer but the output head;
- ``attention``: derived from the architecture, every linear layer inside the LLM's attention
  blocks, whatever the family calls them (``q_proj k_proj v_proj o_proj`` for Llama, Mistral,
  Qwen2 and Gemma 2, ``qkv_proj o_proj`` for Phi-3, ``c_attn c_proj`` for GPT-2). It becomes a
  regular expression over full module paths, so a name the MLP shares (GPT-2's ``c_proj``) is
  adapted only where it sits in attention.

An attention block is a module whose class name ends in ``Attention`` (the Hugging Face naming of
every family here); its linear layers are ``nn.Linear`` or GPT-2's ``Conv1D``.
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn

DERIVED = ("attention",)
LINEAR_CLASSES = ("Linear", "Conv1D")


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ in LINEAR_CLASSES


def attention_projections(llm: nn.Module) -> dict[str, list[str]]:
    """Full path of each attention block -> the names of its linear layers (relative to it)."""
    blocks: dict[str, list[str]] = {}
    for name, module in llm.named_modules():
        if not type(module).__name__.endswith("Attention"):
            continue
        inner = [sub for sub, m in module.named_modules() if sub and _is_linear(m)]
        if inner:
            blocks[name] = inner
    return blocks


def attention_pattern(llm: nn.Module) -> str:
    """The peft ``target_modules`` regular expression (full match) for every attention linear layer."""
    blocks = attention_projections(llm)
    if not blocks:
        raise ValueError(
            f"model.lora.target_modules='attention': {type(llm).__name__} has no attention block with "
            f"linear layers (no module class ending in 'Attention'); name the target modules instead"
        )
    # the blocks' paths differ only by layer index: one pattern with \d+ for each index
    paths = sorted({re.sub(r"\\\.\d+\\\.", r"\\.\\d+\\.", re.escape(p)) for p in blocks})
    layers = sorted({sub for subs in blocks.values() for sub in subs})
    return rf"(.*\.)?({'|'.join(paths)})\.({'|'.join(re.escape(s) for s in layers)})"


def resolve_targets(llm: nn.Module, targets: Any) -> str | list[str]:
    """``model.lora.target_modules`` as peft takes it."""
    if targets == "attention":
        return attention_pattern(llm)
    return targets if isinstance(targets, str) else list(targets)


def describe(llm: nn.Module, targets: Any) -> list[str]:
    """The full names of the linear modules ``targets`` selects (what peft will wrap).

    The tests check it against peft."""
    resolved = resolve_targets(llm, targets)
    names = [n for n, m in llm.named_modules() if n and _is_linear(m)]
    if isinstance(resolved, str):
        if resolved == "all-linear":
            get_head = getattr(llm, "get_output_embeddings", None)  # a transformers model's head
            head = get_head() if get_head is not None else None
            return [n for n in names if llm.get_submodule(n) is not head]
        return [n for n in names if re.fullmatch(resolved, n)]
    return [n for n in names if any(n == t or n.endswith("." + t) for t in resolved)]
