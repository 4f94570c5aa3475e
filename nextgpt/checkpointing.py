"""Activation checkpointing (``model.llm.activation_checkpointing``) and ``torch.compile``
(``model.llm.compile``) of the LLM's decoder layers.

Each decoder layer (a module whose class name ends in ``DecoderLayer``, as in every Hugging Face
causal LM) keeps only its inputs for the backward pass and recomputes the rest there
(``torch.utils.checkpoint``, non-reentrant). Unlike transformers' own ``gradient_checkpointing_enable``
this also works while the LLM is frozen and in eval mode (stages 1 and 2, where the gradient still
flows through the LLM to the projectors and new-token rows): transformers checkpoints only in
training mode, and putting a frozen LLM in training mode would switch its dropout on. Without
gradients (generation, evaluation) the layers run as they are.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

LAYER_SUFFIX = "DecoderLayer"


def outermost_by_class_suffix(model: nn.Module, suffixes: tuple[str, ...]) -> list[str]:
    """Names of the outermost modules whose class name ends with one of ``suffixes`` (any Hugging
    Face causal LM names its blocks ``*DecoderLayer``; the FSDP wrap policy uses this too)."""
    found: list[str] = []
    for name, module in model.named_modules():
        if (
            name
            and type(module).__name__.endswith(suffixes)
            and not any(name.startswith(f"{f}.") for f in found)
        ):
            found.append(name)
    return found


def decoder_layers(llm: nn.Module) -> list[str]:
    """The outermost modules whose class name ends in ``DecoderLayer``."""
    return outermost_by_class_suffix(llm, (LAYER_SUFFIX,))


def _layers_for(llm: nn.Module, key: str) -> list[str]:
    """The decoder layers ``key`` (``model.llm.<key>=true``) acts on; an error naming it when there are none."""
    names = decoder_layers(llm)
    if not names:
        raise ValueError(
            f"model.llm.{key}=true: {type(llm).__name__} has no module whose class name ends in "
            f"{LAYER_SUFFIX!r}"
        )
    return names


def checkpoint_decoder_layers(llm: nn.Module) -> list[str]:
    """Wrap every decoder layer's forward in a non-reentrant checkpoint; returns their names."""
    names = _layers_for(llm, "activation_checkpointing")
    for name in names:
        layer = llm.get_submodule(name)
        if getattr(layer, "_nextgpt_checkpointed", False):
            continue
        inner = layer.forward

        def forward(*args, _inner=inner, **kwargs):
            if torch.is_grad_enabled():
                return checkpoint(_inner, *args, use_reentrant=False, **kwargs)
            return _inner(*args, **kwargs)

        layer.forward = forward
        layer._nextgpt_checkpointed = True  # type: ignore[assignment]  # torch types Module attributes as Tensor | Module
    return names


def compile_decoder_layers(llm: nn.Module, backend: str = "inductor") -> list[str]:
    """``torch.compile`` each decoder layer on its own (``model.llm.compile``): one small graph
    reused by every layer, compatible with FSDP2 units and with the checkpointing above (applied
    first, so the recomputation is compiled too). The rest of the model stays eager."""
    names = _layers_for(llm, "compile")
    for name in names:
        llm.get_submodule(name).compile(backend=backend)
    return names


def malloc_in_use() -> int | None:
    """Bytes the C allocator has handed out and not taken back (glibc ``mallinfo2``: heap plus
    mmap'd blocks), or None where that is not available. PyTorch's CPU tensors come from it, so the
    difference across a forward pass is what the pass keeps alive: activations and outputs."""

    class MallInfo2(ctypes.Structure):
        _fields_ = [
            (f, ctypes.c_size_t)
            for f in (
                "arena",
                "ordblks",
                "smblks",
                "hblks",
                "hblkhd",
                "usmblks",
                "fsmblks",
                "uordblks",
                "fordblks",
                "keepcost",
            )
        ]

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallinfo2.restype = MallInfo2
    except (OSError, AttributeError):
        return None
    info = libc.mallinfo2()
    return int(info.uordblks + info.hblkhd)


def memory_kept_by(fn) -> tuple[object, int | None]:
    """Run ``fn()`` (a forward pass) and measure the CPU memory it leaves allocated: ``(out, bytes)``."""
    gc.collect()
    before = malloc_in_use()
    out = fn()
    after = malloc_in_use()
    return out, None if before is None or after is None else after - before
