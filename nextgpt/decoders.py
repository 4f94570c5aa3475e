"""Frozen diffusion decoders: their text encoders (the alignment target) and their pipelines.

A decoder is any diffusers pipeline folder. Its text conditioning is read the way that pipeline
reads it itself, named by ``conditioning`` in the model config:

- ``last_hidden_state``: CLIP-style token states (Stable Diffusion, ZeroScope): (77, width)
- ``text_embeds``: a pooled, L2-normalised projection (AudioLDM's CLAP): (1, width), passed to the
  pipeline without the sequence axis.

Shapes are never typed in: they are measured by encoding the empty prompt.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

CONDITIONINGS: dict[str, Callable[[Any, dict], torch.Tensor]] = {
    "last_hidden_state": lambda enc, tok: enc(input_ids=tok["input_ids"]).last_hidden_state,
    "text_embeds": lambda enc, tok: F.normalize(
        enc(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]).text_embeds, dim=-1
    ).unsqueeze(1),
}


def read_model_index(path: str | Path) -> dict:
    index = Path(path) / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(f"decoder folder {path} has no model_index.json (not a diffusers pipeline folder)")
    return json.loads(index.read_text())


class TextConditioner:
    """A decoder's own frozen text encoder and tokenizer, loaded from the pipeline folder.

    Kept outside ``nn.Module`` trees on purpose: it is never trained, never checkpointed and
    never sharded.
    """

    def __init__(self, path: str | Path, conditioning: str, dtype: torch.dtype = torch.float32):
        import transformers

        if conditioning not in CONDITIONINGS:
            raise ValueError(f"unknown decoder conditioning {conditioning!r}; known: {sorted(CONDITIONINGS)}")
        self.path, self.conditioning = Path(path), conditioning
        index = read_model_index(path)
        enc_cls = getattr(transformers, index["text_encoder"][1])
        tok_cls = getattr(transformers, index["tokenizer"][1])
        self.text_encoder = enc_cls.from_pretrained(self.path, subfolder="text_encoder", dtype=dtype).eval()
        self.text_encoder.requires_grad_(False)
        self.tokenizer = tok_cls.from_pretrained(self.path, subfolder="tokenizer")
        self._shape: tuple[int, int] | None = None

    @property
    def device(self) -> torch.device:
        return next(self.text_encoder.parameters()).device

    def to(self, device: torch.device | str) -> "TextConditioner":
        self.text_encoder.to(device)
        return self

    @torch.no_grad()
    def encode(self, captions: list[str]) -> torch.Tensor:
        """(N, seq, width) conditioning of ``captions``, exactly as the pipeline computes it."""
        tok = self.tokenizer(
            captions, padding="max_length", max_length=self.tokenizer.model_max_length,
            truncation=True, return_tensors="pt",
        ).to(self.device)
        return CONDITIONINGS[self.conditioning](self.text_encoder, tok).float()

    @property
    def shape(self) -> tuple[int, int]:
        """(seq, width) of one conditioning, measured on the empty prompt."""
        if self._shape is None:
            self._shape = tuple(self.encode([""]).shape[1:])  # type: ignore[assignment]
        return self._shape  # type: ignore[return-value]

    def to_pipeline(self, conditioning: torch.Tensor) -> torch.Tensor:
        """Our (N, seq, width) tensors -> what the pipeline's ``prompt_embeds`` expects."""
        return conditioning.squeeze(1) if self.conditioning == "text_embeds" else conditioning

    def fingerprint(self) -> str:
        """Identifies the text encoder (config and weights) and tokenizer, for caches of its outputs;
        independent of where the folder lies, so a moved or copied pipeline keeps its caches."""
        import hashlib

        from nextgpt.cache.store import file_signature

        h = hashlib.sha1(self.conditioning.encode())
        for sub in ("text_encoder", "tokenizer"):
            for f in sorted((self.path / sub).glob("*")):
                if f.is_file():
                    h.update(f.name.encode())
                    h.update(f.read_bytes() if f.suffix in {".json", ".txt"} else file_signature(f).encode())
        return h.hexdigest()[:16]


def load_pipeline(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """The full diffusers pipeline of a decoder, loaded through ``from_pretrained``."""
    from diffusers import DiffusionPipeline

    read_model_index(path)
    pipe = DiffusionPipeline.from_pretrained(str(path), dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
