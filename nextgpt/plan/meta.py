"""The run's model on the meta device, from the backbones' own configs (the published ones in
:mod:`nextgpt.plan.cards` where a folder is absent): LoRA applied and the stage's groups made
trainable exactly as a run does, so that the plan reads parameter counts and dtypes off it."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from nextgpt.decoders import read_model_index
from nextgpt.encoders.imagebind import ImageBindModel
from nextgpt.model import NextGPT, encoder_arch, torch_dtype
from nextgpt.model_spec import COMPONENTS, ModelSpec
from nextgpt.plan import cards
from nextgpt.stages import STAGES, trainable_groups_of
from nextgpt.tokens import TokenLayout, nextgpt_tokens


class PlanError(ValueError):
    """A plan can not be made: the message names the key or folder."""


def llm_config(path: str) -> tuple[PretrainedConfig, str]:
    folder = Path(path)
    if (folder / "config.json").is_file():
        return AutoConfig.from_pretrained(str(folder)), str(folder / "config.json")
    card = cards.LLMS.get(folder.name)
    if card is None:
        raise PlanError(
            f"model.llm.path={path!r}: no config.json there and no published config for {folder.name!r} "
            f"(known: {sorted(cards.LLMS)})"
        )
    data = dict(card)
    return AutoConfig.for_model(str(data.pop("model_type")), **data), f"published {folder.name} config"


def _text_encoder(folder: Path, sub: str, tok_sub: str):
    """A decoder's text encoder (subfolder ``sub``) built on meta, and its tokenizer's (``tok_sub``) length."""
    if (folder / sub / "config.json").is_file():
        config = AutoConfig.from_pretrained(str(folder / sub))
        tok = folder / tok_sub / "tokenizer_config.json"
        max_len = json.loads(tok.read_text()).get("model_max_length", 77) if tok.is_file() else 77
        cls = getattr(transformers, read_model_index(folder)[sub][1])
    else:
        card = cards.PIPELINES.get(folder.name)
        if card is None:
            raise PlanError(
                f"decoder path {folder}: no {sub}/config.json there and no published config for "
                f"{folder.name!r} (known: {sorted(cards.PIPELINES)})"
            )
        data = dict(card[0])
        config, max_len = AutoConfig.for_model(str(data.pop("model_type")), **data), card[1]
        cls = (
            transformers.ClapTextModelWithProjection
            if config.model_type == "clap_text_model"
            else (transformers.CLIPTextModel)
        )
    with torch.device("meta"):
        return cls(config), int(min(max_len, 512))


def conditioning_shape(folder: Path, conditioning: str) -> tuple[tuple[int, int], list[torch.nn.Module]]:
    """(seq, width) of a decoder's conditioning and its text encoders (on meta): the components the
    conditioning kind reads (:data:`nextgpt.model_spec.COMPONENTS`), measured as it reads them."""
    built = [_text_encoder(folder, enc, tok) for enc, tok in COMPONENTS[conditioning]]
    encoders, max_len = [enc for enc, _ in built], built[0][1]
    if conditioning == "text_embeds":
        return (1, int(encoders[0].config.projection_dim)), encoders
    if conditioning == "sdxl":  # the token rows of both encoders side by side, plus the pooled row
        return (max_len + 1, sum(int(enc.config.hidden_size) for enc in encoders)), encoders
    return (max_len, int(encoders[0].config.hidden_size)), encoders


def denoiser_params(folder: Path) -> int:
    """Parameters of a decoder's UNet + VAE (built on meta from their configs)."""
    import diffusers  # deferred: diffusers costs ~2 s; only planning the denoising loss needs it

    total = 0
    for sub, slot in (("unet", 2), ("vae", 3)):
        if (folder / sub / "config.json").is_file():
            config = json.loads((folder / sub / "config.json").read_text())
        else:
            card = cards.PIPELINES.get(folder.name)
            config = card[slot] if card else None
            if config is None:
                raise PlanError(
                    f"decoder path {folder}: no {sub}/config.json and no published {sub} config to plan its "
                    f"denoising loss"
                )
        cls = getattr(diffusers, config["_class_name"])
        with torch.device("meta"):
            model = cls.from_config({k: v for k, v in config.items() if not k.startswith("_")})
        total += sum(p.numel() for p in model.parameters())
    return total


def meta_model(spec: ModelSpec, stage: int):
    """The stage's NextGPT on the meta device, trainable groups set: (model, llm config, sources)."""
    config, source = llm_config(spec.llm.path)
    with torch.device("meta"):
        llm = AutoModelForCausalLM.from_config(config, dtype=torch_dtype(spec.llm.dtype))
        encoder = ImageBindModel(encoder_arch(spec.encoder, spec.modalities))
        encoder = encoder.to(torch_dtype(spec.encoder.torch_dtype_name))
    counts = spec.signal_counts
    markers, signals = nextgpt_tokens(counts, spec.markers)
    first = int(config.get_text_config().vocab_size)
    ids = iter(range(first + len(markers), first + len(markers) + len(signals)))
    layout = TokenLayout(
        first,
        tuple(markers),
        tuple(signals),
        {n: (first, first + 1) for n in counts},
        {n: tuple(next(ids) for _ in range(c)) for n, c in counts.items()},
    )
    shapes, text_encoders = {}, {}
    for name, dec in spec.generated.items():
        shapes[name], text_encoders[name] = conditioning_shape(Path(dec.path), dec.conditioning)
    with torch.device("meta"):
        model = NextGPT(
            llm,
            encoder,
            layout,
            num_media_tokens=spec.input_projector.num_tokens,
            output_shapes=shapes,
            output_projector=spec.output_projector,
        )
        if STAGES[stage].use_lora:
            model.apply_lora(spec.need_lora())
    model.set_trainable(trainable_groups_of(stage, spec))
    return model, config.get_text_config(), source, text_encoders
