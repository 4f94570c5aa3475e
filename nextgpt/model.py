"""NextGPT: ImageBind -> input projector -> LLM (+ new-token table) -> output projectors.

Plain PyTorch, no Lightning. Every width comes from a loaded backbone: the LLM's hidden size
from its config, ImageBind's from its checkpoint config, each decoder's conditioning shape from
its own text encoder.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from nextgpt import modality as modality_registry
from nextgpt.checkpointing import checkpoint_decoder_layers, compile_decoder_layers
from nextgpt.decoders import TextConditioner
from nextgpt.encoders.imagebind import ImageBindModel, load_imagebind
from nextgpt.encoders.imagebind_config import ImageBindConfig
from nextgpt.gather import full_tensor
from nextgpt.lora import resolve_targets
from nextgpt.model_spec import EncoderSpec, LoraSpec, ModelSpec, OutputProjectorSpec
from nextgpt.projectors import InputProjector, OutputProjector
from nextgpt.tokens import NewTokenTable, TokenLayout, Tokens, load_tokenizer

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def torch_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; known: {sorted(DTYPES)}") from None


@dataclass
class NextGPTOutput:
    logits: torch.Tensor | None  # (B, L, extended vocab); None when the forward was asked for none
    hidden: torch.Tensor  # (B, L, H) last layer
    conditioning: dict[str, torch.Tensor] = field(default_factory=dict)  # modality -> (groups, seq, width)


class NextGPT(nn.Module):
    """The trainable glue around three frozen backbones."""

    def __init__(
        self,
        llm: PreTrainedModel,
        encoder: ImageBindModel,
        layout: TokenLayout,
        *,
        num_media_tokens: int,
        output_shapes: Mapping[str, tuple[int, int]],
        output_projector: OutputProjectorSpec,
    ):
        super().__init__()
        self.llm = llm
        self.encoder = encoder
        self.layout = layout
        hidden = llm.config.get_text_config().hidden_size
        self.new_tokens = NewTokenTable(layout, self.token_embedding(), llm.get_output_embeddings())
        self.input_projector = InputProjector(encoder.embed_dim, hidden, num_media_tokens)
        self.output_projectors = nn.ModuleDict(
            {
                name: OutputProjector(hidden, width, seq, **output_projector.kwargs())
                for name, (seq, width) in output_shapes.items()
            }
        )
        for module in (self.llm, self.encoder):
            module.requires_grad_(False)
            module.eval()
        # the LLM's old vocabulary rows of an imported checkpoint that trained them ("embed", "head"),
        # written into the frozen matrices by the bundle loader and carried into the next bundle
        self.base_rows: dict[str, torch.Tensor] | None = None

    def token_embedding(self) -> nn.Embedding:
        """The LLM's input embedding: transformers types it ``nn.Module``; every causal LM's is an
        ``nn.Embedding`` (or a subclass, as Gemma's scaled one)."""
        return cast(nn.Embedding, self.llm.get_input_embeddings())

    # --- frozen stays frozen ---------------------------------------------------------------
    def train(self, mode: bool = True) -> NextGPT:
        """Children without trainable parameters stay in eval mode (no dropout in frozen nets)."""
        super().train(mode)
        for child in self.children():
            if not any(p.requires_grad for p in child.parameters()):
                child.eval()
        return self

    # --- what the stages train -------------------------------------------------------------
    def parameter_groups(self) -> dict[str, list[str]]:
        """Trainable group -> the names of its parameters. A stage trains a set of these groups
        (``NextGPTStage.trainable_groups``); everything else is frozen backbone."""
        modules = {
            "input_projector": self.input_projector,
            "output_projectors": self.output_projectors,
            "new_tokens.markers": self.new_tokens.markers,
            "new_tokens.signals": self.new_tokens.signals,
        }
        groups = {g: [f"{g}.{n}" for n, _ in m.named_parameters()] for g, m in modules.items()}
        groups["lora"] = [
            f"llm.{n}" for n, _ in self.llm.named_parameters() if ".lora_" in n
        ]  # peft's adapters
        matrices = {id(self.llm.get_input_embeddings().weight), id(self.llm.get_output_embeddings().weight)}
        groups["vocab_rows"] = [
            f"llm.{n}" for n, p in self.llm.named_parameters() if id(p) in matrices
        ]  # model.vocab_rows=all
        return groups

    def vocab_rows_state(self) -> dict[str, torch.Tensor]:
        """The LLM's own (old-vocabulary) rows of its embedding and head, whole: what a bundle keeps
        as ``base_rows.safetensors``. Every rank must call it under FSDP2 / ZeRO-3 (it gathers)."""
        n = self.layout.first_new_id
        return {
            "embed": full_tensor(self.token_embedding().weight)[:n].detach().clone(),
            "head": full_tensor(self.llm.get_output_embeddings().weight)[:n].detach().clone(),
        }

    def set_trainable(self, groups: Iterable[str]) -> list[str]:
        """Make exactly ``groups`` trainable, everything else frozen; returns the trainable names.

        A group that holds no parameter is an error: a stage that silently trains nothing is the
        bug this exists to prevent."""
        known = self.parameter_groups()
        groups = list(groups)
        unknown = [g for g in groups if g not in known]
        if unknown:
            raise ValueError(f"unknown trainable group(s) {unknown}; known: {sorted(known)}")
        empty = [g for g in groups if not known[g]]
        if empty:
            raise ValueError(f"trainable group(s) {empty} match no parameter of the model (is LoRA applied?)")
        wanted = {n for g in groups for n in known[g]}
        names = []
        for name, p in self.named_parameters():
            p.requires_grad_(name in wanted)
            if name in wanted:
                names.append(name)
        self.train(self.training)  # re-apply the frozen-children-in-eval rule
        return names

    # --- embedding -------------------------------------------------------------------------
    # Training calls run every modality's encoder trunk, the input projector and every output
    # projector on every batch, on zero rows when the batch has nothing for them, and keep each
    # result in the loss graph. All data-parallel ranks then run the same modules in the same
    # order whatever their batches hold: DDP's reducer gets a gradient for every trainable
    # parameter (no unused-parameter search), and FSDP / ZeRO-3 issue the same all-gathers.
    @property
    def modality_names(self) -> tuple[str, ...]:
        return tuple(self.output_projectors)

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.new_tokens.embed(input_ids, self.token_embedding())

    def encode_media(
        self, media: Mapping[str, torch.Tensor], *, every_modality: bool = False
    ) -> dict[str, torch.Tensor]:
        """modality -> (N, num_media_tokens, H): frozen ImageBind, then the trainable projector."""
        # the generated modalities on zero rows (see above) and whatever the batch holds (input-only
        # modalities share the input projector, so skipping them when absent leaves nothing unused)
        names = tuple(dict.fromkeys([*(self.modality_names if every_modality else ()), *media]))
        feats = {}
        for name in names:
            trunk = modality_registry.get(name).encoder_modality
            x = media[name] if name in media else self.encoder.empty_input(trunk)
            with torch.no_grad():
                feats[name] = self.encoder.features(trunk, x)
        return self.project_features(feats)

    def project_features(
        self, features: Mapping[str, torch.Tensor], *, every_modality: bool = False
    ) -> dict[str, torch.Tensor]:
        """ImageBind features (fresh or cached) -> (N, num_media_tokens, H)."""
        weight = self.input_projector.proj.weight
        names = tuple(dict.fromkeys([*(self.modality_names if every_modality else ()), *features]))
        out = {}
        for name in names:
            f = features[name] if name in features else weight.new_zeros(0, self.encoder.embed_dim)
            out[name] = self.input_projector(f.to(device=weight.device, dtype=weight.dtype))
        return out

    def embed_inputs(
        self,
        input_ids: torch.Tensor,
        media_mask: torch.Tensor | None = None,
        media: Mapping[str, torch.Tensor] | None = None,
        media_sequence: Iterable[tuple] = (),
        media_features: Mapping[str, torch.Tensor] | None = None,
        *,
        every_modality: bool = False,
    ) -> torch.Tensor:
        """Token embeddings with the projected media written into the media slots, in order.

        ``media`` holds preprocessed inputs for ImageBind; ``media_features`` holds ImageBind
        outputs read from a feature cache. ``media_sequence`` lists ``(modality, index, cached)``
        in slot order (``cached`` may be left out: raw media). ``every_modality``: run every
        modality's path (training; see above).
        """
        embeds = self.embed_tokens(input_ids)
        has_media = media_mask is not None and bool(media_mask.any())
        if not (has_media or every_modality):
            return embeds
        projected = {
            False: self.encode_media(media or {}, every_modality=every_modality),
            True: self.project_features(media_features or {}, every_modality=every_modality),
        }
        rows = [
            projected[bool(entry[2]) if len(entry) > 2 else False][entry[0]][entry[1]]
            for entry in media_sequence
        ]
        # zero-row slices of every projection: they add nothing, and keep each call in the graph
        rows += [p.flatten(0, 1)[:0] for part in projected.values() for p in part.values()]
        ordered = torch.cat(rows).to(embeds.dtype)
        if media_mask is None:
            media_mask = torch.zeros(input_ids.shape, dtype=torch.bool, device=input_ids.device)
        n_slots = int(media_mask.sum())
        if ordered.shape[0] != n_slots:
            raise ValueError(f"batch has {n_slots} media slots but {ordered.shape[0]} projected media tokens")
        return embeds.masked_scatter(media_mask.unsqueeze(-1), ordered)

    # --- forward ---------------------------------------------------------------------------
    def signal_conditioning(
        self, input_ids: torch.Tensor, hidden: torch.Tensor, *, every_modality: bool = False
    ) -> dict[str, torch.Tensor]:
        """Output-projector conditioning of every complete signal group present in ``input_ids``
        (with ``every_modality``: of every modality, ``(0, seq, width)`` where none is present)."""
        out = {}
        for name, projector in self.output_projectors.items():
            ids = torch.tensor(self.layout.signal_ids[name], device=input_ids.device)
            mask = torch.isin(input_ids, ids)
            if not (every_modality or mask.any()):
                continue
            n = len(ids)
            states = hidden[mask] + self.embed_tokens(input_ids[mask]).to(hidden.dtype)
            out[name] = projector(states.view(-1, n, states.shape[-1]))
        return out

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        media_mask: torch.Tensor | None = None,
        media: Mapping[str, torch.Tensor] | None = None,
        media_sequence: Iterable[tuple] = (),
        media_features: Mapping[str, torch.Tensor] | None = None,
        every_modality: bool = True,
        position_ids: torch.Tensor | None = None,
        compute_logits: bool = True,
        **_: Any,
    ) -> NextGPTOutput:
        """The training forward: every modality's modules run (see above); ``conditioning`` holds
        every modality, with zero groups where the batch has none. ``every_modality=False`` runs
        only what the batch holds: for one process only (``benchmarks/ddp_step.py`` measures it).
        ``position_ids`` without ``attention_mask``: a packed batch (:class:`nextgpt.batch.Collator`).
        ``compute_logits=False``: no vocabulary logits (``logits`` is None); the loss computes those
        it needs from ``hidden`` (:func:`nextgpt.losses.chunked_caption_loss_sum`)."""
        embeds = self.embed_inputs(
            input_ids, media_mask, media, media_sequence, media_features, every_modality=every_modality
        )
        keep = {} if compute_logits else {"logits_to_keep": 1}  # transformers: the last position's only
        out = self.llm(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            output_hidden_states=True,
            use_cache=False,
            **keep,
        )
        hidden = out.hidden_states[-1]
        logits = self.new_tokens.logits(hidden, out.logits) if compute_logits else None
        return NextGPTOutput(
            logits, hidden, self.signal_conditioning(input_ids, hidden, every_modality=every_modality)
        )

    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits over the extended vocabulary from final hidden states, as the LLM's forward
        computes them (its head, and its final soft-capping where it has one, as Gemma 2)."""
        base = self.llm.get_output_embeddings()(hidden)
        cap = getattr(self.llm.config.get_text_config(), "final_logit_softcapping", None)
        if cap:
            base = torch.tanh(base / cap) * cap
        return self.new_tokens.logits(hidden, base)

    # --- LoRA ------------------------------------------------------------------------------
    def apply_lora(self, lora: LoraSpec) -> None:
        """Wrap the LLM with peft LoRA adapters as ``model.lora`` says (r, alpha, dropout, target_modules)."""
        from peft import LoraConfig, get_peft_model  # deferred: peft costs ~1.5 s; only LoRA stages need it

        # module names, "all-linear" (peft: every Linear but the head) or "attention" (nextgpt/lora.py)
        targets = resolve_targets(self.llm, lora.target_modules)
        config = LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,  # type: ignore[arg-type]  # peft says int; it scales by alpha / r
            lora_dropout=lora.dropout,
            target_modules=targets,
            bias="none",
        )
        # a PeftModel forwards every attribute it lacks (config, embeddings) to the causal LM it wraps
        self.llm = cast(PreTrainedModel, get_peft_model(self.llm, config))


# --- building from config ----------------------------------------------------------------------
def load_conditioners(spec: ModelSpec) -> dict[str, TextConditioner]:
    return {name: TextConditioner(dec.path, dec.conditioning) for name, dec in spec.generated.items()}


def encoder_arch(encoder: EncoderSpec, modalities: Iterable[str] = ()) -> ImageBindConfig:
    """The ImageBind architecture: the branches its config names plus those ``modalities``
    (registry names) are encoded by (a model configured with depth maps builds the depth trunk)."""
    arch = ImageBindConfig.from_dict(dict(encoder.arch))
    trunks = {modality_registry.get(m).encoder_modality for m in modalities}
    if not trunks <= set(arch.modalities):
        arch = dataclasses.replace(
            arch, modalities=(*arch.modalities, *sorted(trunks - set(arch.modalities)))
        )
    return arch


def load_encoder(spec: EncoderSpec, modalities: Iterable[str] = ()) -> ImageBindModel:
    """The frozen ImageBind of :func:`encoder_arch`, loaded from its checkpoint."""
    arch = encoder_arch(spec, modalities)
    encoder = load_imagebind(spec.checkpoint, arch, dtype=torch_dtype(spec.torch_dtype_name))
    encoder.renormalize_features = spec.renormalize
    return encoder


def build_nextgpt(
    spec: ModelSpec,
    conditioners: Mapping[str, TextConditioner] | None = None,
    tokens: Tokens | None = None,
) -> tuple[NextGPT, PreTrainedTokenizerBase, dict[str, TextConditioner]]:
    """Load every backbone through its real loading path and assemble a NextGPT; ``tokens``: the
    tokenizer and layout already loaded for this model (the data's), else loaded here.

    Returns (model, tokenizer, conditioners).
    """
    tokenizer, layout = tokens if tokens is not None else load_tokenizer(spec)
    llm_spec = spec.llm
    extra = {"attn_implementation": llm_spec.attn_implementation} if llm_spec.attn_implementation else {}
    llm = AutoModelForCausalLM.from_pretrained(llm_spec.path, dtype=torch_dtype(llm_spec.dtype), **extra)
    if llm_spec.activation_checkpointing:
        checkpoint_decoder_layers(llm)
    if llm_spec.compile:
        compile_decoder_layers(llm, backend=llm_spec.compile_backend)
    encoder = load_encoder(spec.encoder, spec.modalities)
    conditioners = dict(conditioners) if conditioners is not None else load_conditioners(spec)
    model = NextGPT(
        llm,
        encoder,
        layout,
        num_media_tokens=spec.input_projector.num_tokens,
        output_shapes={name: c.shape for name, c in conditioners.items()},
        output_projector=spec.output_projector,
    )
    return model, tokenizer, conditioners


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, frozen) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return trainable, frozen
