"""Helpers that strategy configs instantiate."""
from __future__ import annotations

from typing import Iterable

from torch import nn


class WrapByClassName:
    """FSDP auto-wrap policy: one unit per module whose class name ends with a given suffix.

    Any Hugging Face causal LM names its blocks ``*DecoderLayer``, so the policy needs no
    import of a model-specific class and works for Llama, Mistral, Qwen and the rest.
    """

    def __init__(self, suffixes: Iterable[str] = ("DecoderLayer",)):
        self.suffixes = tuple(suffixes)

    def __call__(self, module: nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
        if recurse:
            return True
        return type(module).__name__.endswith(self.suffixes)
