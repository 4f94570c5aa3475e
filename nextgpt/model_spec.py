"""The model spec: ``model`` of the composed (and validated) config, resolved once into frozen
dataclasses (the sections of ``configs/model/*.yaml``; ``nextgpt.schema._check_model`` checks them).

| spec | ``model.`` section | who takes it |
|---|---|---|
| :class:`LLMSpec` | ``llm`` | the LLM's loading (``nextgpt.model.build_nextgpt``), the memory plan |
| :class:`EncoderSpec` | ``encoder`` | ImageBind's loading, the feature caches' fingerprints |
| :class:`InputProjectorSpec` | ``input_projector`` | the model, the data (media tokens per item) |
| :class:`OutputProjectorSpec` | ``output_projector`` | each modality's output projector |
| :class:`LoraSpec` | ``lora`` | stage 3's LoRA adapters |
| :class:`DecoderSpec` | ``modalities.<m>.decoder`` | the decoders, generation, the denoising loss |
| :class:`ModalitySpec` | ``modalities.<m>`` | the token layout, the decoders |
| :class:`ModelSpec` | ``model`` | everything above |

A key the code does not name is kept (``extra``) and written back by ``as_dict``; the output
projector's are passed on to it as before. This module is type-checked strictly
(``[tool.mypy]`` in ``pyproject.toml``).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

from omegaconf import DictConfig, ListConfig, OmegaConf

from nextgpt.config import ConfigError


def plain(node: Any) -> dict[str, Any]:
    """A config node as a plain, resolved dict ({} for null)."""
    if node is None:
        return {}
    if isinstance(node, DictConfig):
        return cast(dict[str, Any], OmegaConf.to_container(node, resolve=True))
    if isinstance(node, Mapping):
        return {str(k): _value(v) for k, v in node.items()}
    raise ConfigError([f"{node!r}: must be a mapping"])


def _value(v: Any) -> Any:
    if isinstance(v, DictConfig | ListConfig):
        return OmegaConf.to_container(v, resolve=True)
    return v


def _section(d: Any, key: str, where: str) -> dict[str, Any]:
    """``d[key]`` as a plain dict; a ``ConfigError`` naming ``where.key`` when it is missing."""
    if d.get(key) is None:
        raise ConfigError([f"{where}.{key}: missing (a mapping section)"])
    value = d[key]
    if not isinstance(value, Mapping):
        raise ConfigError([f"{where}.{key}={value!r}: must be a mapping"])
    return dict(value)


def _required(d: Any, key: str, where: str) -> Any:
    if d.get(key) is None:
        raise ConfigError([f"{where}.{key}: missing"])
    return d[key]


def _extra(d: Any, known: tuple[str, ...]) -> dict[str, Any]:
    return {k: copy.deepcopy(v) for k, v in d.items() if k not in known}


@dataclass(frozen=True)
class LLMSpec:
    """``model.llm``: the language model and how it runs."""

    path: str
    template: str
    dtype: str = "float32"
    attn_implementation: str | None = None  # None: transformers' choice for the family
    activation_checkpointing: bool = False
    compile: bool = False
    compile_backend: str = "inductor"
    extra: Mapping[str, Any] = field(default_factory=dict)

    KEYS = (
        "path",
        "template",
        "dtype",
        "attn_implementation",
        "activation_checkpointing",
        "compile",
        "compile_backend",
    )

    @classmethod
    def of(cls, d: Any, where: str = "model.llm") -> LLMSpec:
        return cls(
            path=str(_required(d, "path", where)),
            template=str(_required(d, "template", where)),
            dtype=str(d.get("dtype") or "float32"),
            attn_implementation=str(d["attn_implementation"]) if d.get("attn_implementation") else None,
            activation_checkpointing=bool(d.get("activation_checkpointing")),
            compile=bool(d.get("compile")),
            compile_backend=str(d.get("compile_backend") or "inductor"),
            extra=_extra(d, cls.KEYS),
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "template": self.template,
            "dtype": self.dtype,
            "attn_implementation": self.attn_implementation,
            "activation_checkpointing": self.activation_checkpointing,
            "compile": self.compile,
            "compile_backend": self.compile_backend,
            **copy.deepcopy(dict(self.extra)),
        }


@dataclass(frozen=True)
class EncoderSpec:
    """``model.encoder``: the frozen ImageBind."""

    checkpoint: str
    arch: Mapping[str, Any]  # ImageBindConfig.from_dict's input (``{preset: huge}``, or every field)
    dtype: str | None = None  # None: float32 (and no dtype in the cache fingerprint, as before)
    renormalize: bool = True  # L2-normalise every feature before the input projector
    extra: Mapping[str, Any] = field(default_factory=dict)

    KEYS = ("checkpoint", "arch", "dtype", "renormalize")

    @classmethod
    def of(cls, d: Any, where: str = "model.encoder") -> EncoderSpec:
        renormalize = d.get("renormalize", True)
        return cls(
            checkpoint=str(_required(d, "checkpoint", where)),
            arch=_section(d, "arch", where),
            dtype=None if d.get("dtype") is None else str(d["dtype"]),
            renormalize=True if renormalize is None else bool(renormalize),
            extra=_extra(d, cls.KEYS),
        )

    @property
    def torch_dtype_name(self) -> str:
        return self.dtype or "float32"

    def as_dict(self) -> dict[str, Any]:
        return {
            "checkpoint": self.checkpoint,
            "arch": copy.deepcopy(dict(self.arch)),
            "dtype": self.dtype,
            "renormalize": self.renormalize,
            **copy.deepcopy(dict(self.extra)),
        }


@dataclass(frozen=True)
class InputProjectorSpec:
    """``model.input_projector``: LLM tokens per encoded item."""

    num_tokens: int = 1

    @classmethod
    def of(cls, d: Any, where: str = "model.input_projector") -> InputProjectorSpec:
        return cls(num_tokens=int(_required(d, "num_tokens", where)))

    def as_dict(self) -> dict[str, Any]:
        return {"num_tokens": self.num_tokens}


@dataclass(frozen=True)
class OutputProjectorSpec:
    """``model.output_projector``: the keyword arguments of ``nextgpt.projectors.OutputProjector``;
    a key left out (None) takes the projector's default (``query_std``: given as null, it is None)."""

    d_model: int | None = None
    nhead: int | None = None
    num_encoder_layers: int | None = None
    num_decoder_layers: int | None = None
    dim_feedforward: int | None = None
    dropout: float | None = None
    norm_first: bool | None = None
    query_std: float | None = None
    given: tuple[str, ...] = ()  # the keys the config names (query_std: null is named, and passed)
    extra: Mapping[str, Any] = field(default_factory=dict)  # passed on too: the projector refuses them

    KEYS = (
        "d_model",
        "nhead",
        "num_encoder_layers",
        "num_decoder_layers",
        "dim_feedforward",
        "dropout",
        "norm_first",
        "query_std",
    )

    @classmethod
    def of(cls, d: Any) -> OutputProjectorSpec:
        known = cls.KEYS

        def num(key: str) -> int | None:
            return None if d.get(key) is None else int(d[key])

        return cls(
            d_model=num("d_model"),
            nhead=num("nhead"),
            num_encoder_layers=num("num_encoder_layers"),
            num_decoder_layers=num("num_decoder_layers"),
            dim_feedforward=num("dim_feedforward"),
            dropout=None if d.get("dropout") is None else float(d["dropout"]),
            norm_first=None if d.get("norm_first") is None else bool(d["norm_first"]),
            query_std=None if d.get("query_std") is None else float(d["query_std"]),
            given=tuple(k for k in known if k in d),
            extra=_extra(d, known),
        )

    def kwargs(self) -> dict[str, Any]:
        """The projector's keyword arguments: the keys the config gave, as it gave them."""
        return {**{k: getattr(self, k) for k in self.given}, **copy.deepcopy(dict(self.extra))}

    def as_dict(self) -> dict[str, Any]:
        return self.kwargs()


@dataclass(frozen=True)
class LoraSpec:
    """``model.lora``: stage 3's adapters (``target_modules``: names, ``all-linear`` or ``attention``)."""

    r: int
    alpha: float
    dropout: float
    target_modules: str | tuple[str, ...]

    @classmethod
    def of(cls, d: Any, where: str = "model.lora") -> LoraSpec:
        targets = _required(d, "target_modules", where)
        return cls(
            r=int(_required(d, "r", where)),
            alpha=float(_required(d, "alpha", where)),
            dropout=float(_required(d, "dropout", where)),
            target_modules=targets if isinstance(targets, str) else tuple(str(t) for t in targets),
        )

    def as_dict(self) -> dict[str, Any]:
        targets = self.target_modules
        return {
            "r": self.r,
            "alpha": self.alpha,
            "dropout": self.dropout,
            "target_modules": targets if isinstance(targets, str) else list(targets),
        }


# conditioning kind -> the pipeline components it reads: (text encoder, its tokenizer) pairs
COMPONENTS: dict[str, tuple[tuple[str, str], ...]] = {
    "last_hidden_state": (("text_encoder", "tokenizer"),),
    "text_embeds": (("text_encoder", "tokenizer"),),
    "sdxl": (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")),
}


def conditioning_mismatch(index: Mapping[str, Any], conditioning: str) -> str | None:
    """Why ``conditioning`` can not read the pipeline of ``index`` (a model_index.json), or None."""
    cls = str(index.get("_class_name"))
    xl = cls.startswith("StableDiffusionXL")
    needs = [c for pair in COMPONENTS.get(conditioning, ()) for c in pair]
    missing = [c for c in needs if not (index.get(c) or [None, None])[1]]
    if missing:
        return f"the {cls} folder has no {' / '.join(missing)}, which {conditioning!r} reads"
    if conditioning == "sdxl" and not xl:
        return f"'sdxl' reads Stable Diffusion XL pipelines, not a {cls}"
    if conditioning != "sdxl" and (index.get("text_encoder_2") or [None, None])[1]:
        return f"a {cls} is conditioned by two text encoders" + (
            " and a pooled embedding: use conditioning: sdxl"
            if xl
            else ", which no conditioning kind reads yet"
        )
    return None


@dataclass(frozen=True)
class DecoderSpec:
    """``model.modalities.<m>.decoder``: a diffusers pipeline, its conditioning and its settings."""

    path: str
    conditioning: str
    denoise: bool = False  # may take part in the denoising loss
    dtype: str = "float32"
    generate: Mapping[str, Any] = field(default_factory=dict)  # the pipeline call's keyword arguments
    save: Mapping[str, Any] = field(default_factory=dict)  # the writer's (fps, ...)
    extra: Mapping[str, Any] = field(default_factory=dict)

    KEYS = ("path", "conditioning", "denoise", "dtype", "generate", "save")

    @classmethod
    def of(cls, d: Any, where: str) -> DecoderSpec:
        return cls(
            path=str(_required(d, "path", where)),
            conditioning=str(_required(d, "conditioning", where)),
            denoise=bool(d.get("denoise")),
            dtype=str(d.get("dtype") or "float32"),
            generate=dict(d.get("generate") or {}),
            save=dict(d.get("save") or {}),
            extra=_extra(d, cls.KEYS),
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "conditioning": self.conditioning,
            "denoise": self.denoise,
            "dtype": self.dtype,
            "generate": copy.deepcopy(dict(self.generate)),
            "save": copy.deepcopy(dict(self.save)),
            **copy.deepcopy(dict(self.extra)),
        }


@dataclass(frozen=True)
class ModalitySpec:
    """``model.modalities.<m>``: its signal tokens and decoder (None: an input-only modality)."""

    num_signal_tokens: int = 0
    decoder: DecoderSpec | None = None

    @classmethod
    def of(cls, d: Any, where: str) -> ModalitySpec:
        dec = d.get("decoder")
        return cls(
            num_signal_tokens=int(d.get("num_signal_tokens") or 0),
            decoder=None
            if dec is None
            else DecoderSpec.of(_section(d, "decoder", where), f"{where}.decoder"),
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "num_signal_tokens": self.num_signal_tokens,
            "decoder": None if self.decoder is None else self.decoder.as_dict(),
        }


@dataclass(frozen=True)
class GenerationSpec:
    """``model.generation``: decoding defaults of ``python -m nextgpt.generate`` (None: its own)."""

    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None

    @classmethod
    def of(cls, d: Any) -> GenerationSpec:
        return cls(
            max_new_tokens=None if d.get("max_new_tokens") is None else int(d["max_new_tokens"]),
            temperature=None if d.get("temperature") is None else float(d["temperature"]),
            top_p=None if d.get("top_p") is None else float(d["top_p"]),
        )

    def as_dict(self) -> dict[str, Any]:
        return {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature, "top_p": self.top_p}


@dataclass(frozen=True)
class ModelSpec:
    """``model``: the backbones, the projectors, the adapters and the modalities, resolved."""

    name: str
    llm: LLMSpec
    encoder: EncoderSpec
    modalities: Mapping[str, ModalitySpec]
    input_projector: InputProjectorSpec = field(default_factory=InputProjectorSpec)
    output_projector: OutputProjectorSpec = field(default_factory=OutputProjectorSpec)
    lora: LoraSpec | None = None  # None: no adapters configured (stage 3 needs them)
    markers: str = "per_modality"  # or "shared": <Img> </Img> around every modality
    vocab_rows: str = "new"  # or "all": every row of the embedding and head trains
    generation: GenerationSpec | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)  # keys of ``model`` not named above

    KEYS = (
        "name",
        "llm",
        "encoder",
        "modalities",
        "input_projector",
        "output_projector",
        "lora",
        "markers",
        "vocab_rows",
        "generation",
        "backbones",  # how the backbones are made (the entry points instantiate model.backbones), not the model
    )

    @classmethod
    def from_config(cls, node: Any) -> ModelSpec:
        """The spec of a ``model`` config node (a DictConfig, resolved, or a plain mapping); a
        ``ConfigError`` names a missing key."""
        if isinstance(node, ModelSpec):
            return node
        d = plain(node)
        mods = _section(d, "modalities", "model")
        lora = d.get("lora")
        generation = d.get("generation")
        return cls(
            name=str(d.get("name") or "?"),
            llm=LLMSpec.of(_section(d, "llm", "model")),
            encoder=EncoderSpec.of(_section(d, "encoder", "model")),
            modalities={
                str(m): ModalitySpec.of(dict(v or {}), f"model.modalities.{m}") for m, v in mods.items()
            },
            input_projector=InputProjectorSpec.of(_section(d, "input_projector", "model"))
            if d.get("input_projector") is not None
            else InputProjectorSpec(),
            output_projector=OutputProjectorSpec.of(dict(d.get("output_projector") or {})),
            lora=None if lora is None else LoraSpec.of(_section(d, "lora", "model")),
            markers=str(d.get("markers") or "per_modality"),
            vocab_rows=str(d.get("vocab_rows") or "new"),
            generation=None if generation is None else GenerationSpec.of(_section(d, "generation", "model")),
            extra=_extra(d, cls.KEYS),
        )

    @property
    def generated(self) -> dict[str, DecoderSpec]:
        """The modalities the model generates (those with a decoder), with their decoders. An
        input-only modality (``decoder: null``) is read through its ImageBind trunk, never generated."""
        return {name: m.decoder for name, m in self.modalities.items() if m.decoder is not None}

    @property
    def signal_counts(self) -> dict[str, int]:
        """Signal tokens per configured modality (0: input-only)."""
        return {name: m.num_signal_tokens for name, m in self.modalities.items()}

    @property
    def trains_all_rows(self) -> bool:
        """``model.vocab_rows=all``: every row of the LLM's embedding and head trains."""
        return self.vocab_rows == "all"

    def need_lora(self) -> LoraSpec:
        """``model.lora``, which a LoRA stage needs."""
        if self.lora is None:
            raise ConfigError(["model.lora: missing (a LoRA stage needs r, alpha, dropout, target_modules)"])
        return self.lora

    def as_dict(self) -> dict[str, Any]:
        """The plain, resolved mapping (the checkpoint's hyperparameters, an export's card)."""
        out: dict[str, Any] = {
            "name": self.name,
            "llm": self.llm.as_dict(),
            "encoder": self.encoder.as_dict(),
            "modalities": {m: v.as_dict() for m, v in self.modalities.items()},
            "input_projector": self.input_projector.as_dict(),
            "output_projector": self.output_projector.as_dict(),
            "lora": None if self.lora is None else self.lora.as_dict(),
            "markers": self.markers,
            "vocab_rows": self.vocab_rows,
        }
        if self.generation is not None:
            out["generation"] = self.generation.as_dict()
        return {**out, **copy.deepcopy(dict(self.extra))}
