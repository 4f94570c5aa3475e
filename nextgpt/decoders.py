"""Frozen diffusion decoders: their text encoders (the alignment target) and their pipelines.

A decoder is any diffusers pipeline folder. Its text conditioning is read the way that pipeline
reads it itself, named by ``conditioning`` in the model config:

- ``last_hidden_state``: CLIP-style token states (Stable Diffusion 1.x and 2.x, ZeroScope):
  (77, width). SD 2's OpenCLIP penultimate layer is already the last layer of its diffusers text encoder.
- ``text_embeds``: a pooled, L2-normalised projection (AudioLDM's CLAP): (1, width), passed to the
  pipeline without the sequence axis.
- ``sdxl``: Stable Diffusion XL's two text encoders: (77 + 1, width1 + width2). Rows 0..76 are the
  penultimate hidden states of ``text_encoder`` and ``text_encoder_2`` concatenated on the feature axis
  (SDXL's ``prompt_embeds``); the LAST row holds ``text_encoder_2``'s pooled ``text_embeds`` (SDXL's
  ``pooled_prompt_embeds``) in its first ``projection_dim`` columns, zero-padded to the width. One
  (seq, width) tensor per item keeps the caches, losses and distributed shapes of the other kinds;
  :func:`split_pooled` takes it apart for the pipeline and the UNet.

Shapes are never typed in: they are measured by encoding the empty prompt.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import transformers

from nextgpt.cache.store import file_signature
from nextgpt.mel import MelFrontEnd
from nextgpt.model_spec import COMPONENTS, DecoderSpec, conditioning_mismatch


def _last_hidden_state(encoders: Sequence[Any], tokens: Sequence[dict]) -> torch.Tensor:
    return encoders[0](input_ids=tokens[0]["input_ids"]).last_hidden_state


def _text_embeds(encoders: Sequence[Any], tokens: Sequence[dict]) -> torch.Tensor:
    out = encoders[0](input_ids=tokens[0]["input_ids"], attention_mask=tokens[0]["attention_mask"])
    return F.normalize(out.text_embeds, dim=-1).unsqueeze(1)


def _sdxl(encoders: Sequence[Any], tokens: Sequence[dict]) -> torch.Tensor:
    """As StableDiffusionXLPipeline.encode_prompt (no clip_skip): hidden_states[-2] of each encoder,
    concatenated, and text_encoder_2's text_embeds as the pooled embedding, in an extra last row."""
    states = [
        enc(input_ids=tok["input_ids"], output_hidden_states=True)
        for enc, tok in zip(encoders, tokens, strict=False)
    ]
    seq = torch.cat([s.hidden_states[-2] for s in states], dim=-1)
    return join_pooled(seq, states[-1].text_embeds)


# conditioning kind -> how it reads the pipeline components it names (model_spec.COMPONENTS)
CONDITIONINGS: dict[str, Callable[[Sequence[Any], Sequence[dict]], torch.Tensor]] = {
    "last_hidden_state": _last_hidden_state,
    "text_embeds": _text_embeds,
    "sdxl": _sdxl,
}


def encode_captions(
    conditioning: str,
    encoders: Sequence[Any],
    tokenizers: Sequence[Any],
    captions: Sequence[str],
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """(N, seq, width) ``conditioning`` of ``captions`` as the pipeline computes it: each tokenizer pads to
    its ``model_max_length``, and ``CONDITIONINGS`` reads the encoders (gradients as the caller's context says)."""
    tokens = [
        tok(
            list(captions),
            padding="max_length",
            max_length=tok.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        for tok in tokenizers
    ]
    if device is not None:  # (BatchEncoding.to(None) logs a warning on every call)
        tokens = [t.to(device) for t in tokens]
    return CONDITIONINGS[conditioning](encoders, tokens)


def join_pooled(seq: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """(N, seq, width) token states + (N, pooled) -> (N, seq + 1, width), pooled zero-padded in the last row."""
    width, pooled_width = seq.shape[-1], pooled.shape[-1]
    if pooled_width > width:
        raise ValueError(
            f"the pooled embedding ({pooled_width} wide) does not fit in a row of the "
            f"{width}-wide token conditioning: the sdxl conditioning needs pooled width <= width"
        )
    return torch.cat([seq, F.pad(pooled, (0, width - pooled_width)).unsqueeze(1)], dim=1)


def split_pooled(conditioning: torch.Tensor, pooled_width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of :func:`join_pooled`: (N, seq + 1, width) -> (N, seq, width), (N, pooled_width)."""
    return conditioning[:, :-1], conditioning[:, -1, :pooled_width]


def pooled_width(path: str | Path) -> int:
    """The width of an SDXL folder's pooled embedding: text_encoder_2's projection_dim."""
    config = Path(path) / "text_encoder_2" / "config.json"
    if not config.is_file():
        raise FileNotFoundError(
            f"decoder folder {path} has no text_encoder_2/config.json, which the sdxl "
            "conditioning reads (is it a StableDiffusionXLPipeline folder?)"
        )
    return int(json.loads(config.read_text())["projection_dim"])


def read_model_index(path: str | Path) -> dict:
    index = Path(path) / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(
            f"decoder folder {path} has no model_index.json (not a diffusers pipeline folder)"
        )
    return json.loads(index.read_text())


def vae_scale_factor(path: str | Path) -> int:
    """How much the folder's VAE shrinks each side: 2 ** (levels - 1), as the pipelines compute it."""
    config = json.loads((Path(path) / "vae" / "config.json").read_text())
    return 2 ** (len(config["block_out_channels"]) - 1)


def target_spec(decoder: DecoderSpec) -> dict[str, Any]:
    """What a denoising-loss target loader needs to size media for ``decoder``: its generation
    settings (``generate``), and for a pipeline with a vocoder (AudioLDM) the vocoder's
    ``sampling_rate`` and, when ``generate`` does not set it, the pipeline's default
    ``audio_length_in_s`` (UNet sample size x VAE scale factor mel frames of ``prod(upsample_rates)``
    samples)."""
    path = Path(decoder.path)
    spec = dict(decoder.generate)
    vocoder = Path(path) / "vocoder" / "config.json"
    if vocoder.is_file():
        mel = MelFrontEnd.from_vocoder(vocoder)
        spec.setdefault("sampling_rate", mel.sampling_rate)
        if spec.get("audio_length_in_s") is None:
            unet = json.loads((Path(path) / "unet" / "config.json").read_text())
            spec["audio_length_in_s"] = (
                int(unet["sample_size"]) * vae_scale_factor(path) * mel.hop / mel.sampling_rate
            )
    return spec


class TextConditioner:
    """A decoder's own frozen text encoder and tokenizer, loaded from the pipeline folder.

    Kept outside ``nn.Module`` trees on purpose: it is never trained, never checkpointed and
    never sharded.
    """

    def __init__(self, path: str | Path, conditioning: str, dtype: torch.dtype = torch.float32):
        if conditioning not in CONDITIONINGS:
            raise ValueError(f"unknown decoder conditioning {conditioning!r}; known: {sorted(CONDITIONINGS)}")
        self.path, self.conditioning = Path(path), conditioning
        index = read_model_index(path)
        why = conditioning_mismatch(index, conditioning)
        if why:
            raise ValueError(f"decoder {path}: conditioning {conditioning!r} does not fit: {why}")
        self.text_encoders, self.tokenizers = [], []
        for enc_name, tok_name in COMPONENTS[conditioning]:
            enc = getattr(transformers, index[enc_name][1]).from_pretrained(
                self.path, subfolder=enc_name, dtype=dtype
            )
            self.text_encoders.append(enc.eval().requires_grad_(False))
            tok_cls = getattr(transformers, index[tok_name][1])
            self.tokenizers.append(tok_cls.from_pretrained(self.path, subfolder=tok_name))
        # no negative prompt means zeros to such a pipeline (SDXL base), not the empty prompt's encoding
        self.zeros_for_empty_prompt = bool(index.get("force_zeros_for_empty_prompt", False))
        self.pooled_width = pooled_width(path) if conditioning == "sdxl" else None
        self._shape: tuple[int, int] | None = None

    @property
    def text_encoder(self):
        return self.text_encoders[0]

    @property
    def tokenizer(self):
        return self.tokenizers[0]

    @property
    def device(self) -> torch.device:
        return next(self.text_encoder.parameters()).device

    def to(self, device: torch.device | str) -> TextConditioner:
        for enc in self.text_encoders:
            enc.to(device)
        return self

    @torch.no_grad()
    def encode(self, captions: list[str]) -> torch.Tensor:
        """(N, seq, width) conditioning of ``captions``, exactly as the pipeline computes it."""
        return encode_captions(
            self.conditioning, self.text_encoders, self.tokenizers, captions, self.device
        ).float()

    @property
    def shape(self) -> tuple[int, int]:
        """(seq, width) of one conditioning, measured on the empty prompt."""
        if self._shape is None:
            self._shape = tuple(self.encode([""]).shape[1:])  # type: ignore[assignment]
        return self._shape  # type: ignore[return-value]

    def negative(self) -> torch.Tensor:
        """(1, seq, width): what the pipeline conditions classifier-free guidance on when given no
        negative prompt: the empty prompt's encoding, or zeros where its force_zeros_for_empty_prompt says so."""
        empty = self.encode([""])
        return torch.zeros_like(empty) if self.zeros_for_empty_prompt else empty

    def pipeline_kwargs(
        self, conditioning: torch.Tensor, negative: torch.Tensor, dtype: torch.dtype | None = None
    ) -> dict[str, torch.Tensor]:
        """Our (N, seq, width) conditioning and its negative (N or 1 rows) -> the pipeline's keyword
        arguments: ``prompt_embeds`` / ``negative_prompt_embeds`` (+ the pooled pair for sdxl)."""
        if negative.shape[0] != conditioning.shape[0]:
            negative = negative.repeat(conditioning.shape[0], *[1] * (negative.dim() - 1))
        if self.conditioning == "sdxl":
            assert self.pooled_width is not None  # set for every sdxl conditioner
            embeds, pooled = split_pooled(conditioning, self.pooled_width)
            neg_embeds, neg_pooled = split_pooled(negative, self.pooled_width)
            out = {
                "prompt_embeds": embeds,
                "negative_prompt_embeds": neg_embeds,
                "pooled_prompt_embeds": pooled,
                "negative_pooled_prompt_embeds": neg_pooled,
            }
        elif self.conditioning == "text_embeds":
            out = {"prompt_embeds": conditioning.squeeze(1), "negative_prompt_embeds": negative.squeeze(1)}
        else:
            out = {"prompt_embeds": conditioning, "negative_prompt_embeds": negative}
        return {k: v.to(dtype) if dtype is not None else v for k, v in out.items()}

    def fingerprint(self) -> str:
        """Identifies the text encoder (config and weights) and tokenizer, for caches of its outputs;
        independent of where the folder lies, so a moved or copied pipeline keeps its caches."""
        h = hashlib.sha1(self.conditioning.encode())
        for sub in (name for pair in COMPONENTS[self.conditioning] for name in pair):
            for f in sorted((self.path / sub).glob("*")):
                if f.is_file():
                    h.update(f.name.encode())
                    h.update(f.read_bytes() if f.suffix in {".json", ".txt"} else file_signature(f).encode())
        return h.hexdigest()[:16]


def load_pipeline(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """The full diffusers pipeline of a decoder, loaded through ``from_pretrained``."""
    from diffusers import DiffusionPipeline  # deferred: diffusers costs ~2 s and only generation needs it

    read_model_index(path)
    pipe = DiffusionPipeline.from_pretrained(str(path), dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
