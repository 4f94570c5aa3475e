"""The original NExT-GPT's delta checkpoint (``pytorch_model.pt``) <-> this project's tensors.

The original (``NExT-GPT-Lagacy/code/model/agent.py:save_model``) saves every trainable tensor
and the named ones of its ``NextGPTModel``:

- ``llama_proj.{weight,bias}``: the input projector, ``Linear(1024 -> 4096)``;
- ``gen_text_hidden_fcs{,_video,_audio}.0.{fc,tfm,model,query_embs}``: the output projectors
  (``TextFcLayer`` in its ``transformer`` mode), image, video, audio;
- the resized ``embed_tokens`` / ``lm_head`` matrices, under ``llama_model.model.`` /
  ``llama_model.`` or, with peft (stage 3), ``llama_model.base_model.model.(model.)``; its new rows
  from the base vocabulary's size on, in its order ``<Img> </Img> [IMG0..] [VID0..] [AUD0..]``;
- in stage 3, peft 0.3's LoRA tensors, which carry the adapter's name:
  ``llama_model.base_model.model.model.layers.N.self_attn.q_proj.lora_A.default.weight``
  (``lora_A`` / ``lora_B`` are ``ModuleDict``s keyed by adapter since peft 0.3, the version the
  original pins). The adapter-less form of older peft (``...q_proj.lora_A.weight``) is read too.

Here the new tokens live in a small table (``NewTokenTable``) beside the frozen matrices and the
LoRA tensors are this model's own peft adapter ``default``. Rows are matched by token name, never
by position. Every key of the checkpoint is mapped or reported in :attr:`Imported.report`
``skipped`` with the reason; the importer (``python -m nextgpt.convert from_legacy``) refuses a
checkpoint with skipped keys unless told ``--allow-unused``. The original also trained its old
vocabulary rows; where they moved from the base LLM's, the import keeps them (``base_rows``), so
the imported model computes what the original computed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from nextgpt import modality as modality_registry

PROJECTOR_PREFIX = {
    "image": "gen_text_hidden_fcs",
    "video": "gen_text_hidden_fcs_video",
    "audio": "gen_text_hidden_fcs_audio",
}
PROJECTOR_PARTS = {"fc": "in_fc", "tfm": "transformer", "model": "out_fc"}
EMBED_KEYS = {
    False: "llama_model.model.embed_tokens.weight",
    True: "llama_model.base_model.model.model.embed_tokens.weight",
}
HEAD_KEYS = {False: "llama_model.lm_head.weight", True: "llama_model.base_model.model.lm_head.weight"}
LEGACY_MODALITY_ORDER = ("image", "video", "audio")  # the order the original adds its signal tokens in
_LORA = re.compile(r"^llama_model\.(?P<path>.+)\.(?P<ab>lora_[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
DEFAULT_ADAPTER = "default"  # peft's name for the adapter get_peft_model adds
_PROJ = re.compile(r"^(?P<prefix>gen_text_hidden_fcs(?:_video|_audio)?)\.0\.(?P<rest>.+)$")


class ConvertError(ValueError):
    """A checkpoint or bundle that does not convert; the message names the key and what differs."""


def legacy_tokens(signal_counts: Mapping[str, int]) -> list[str]:
    """The original's new tokens in its id order: ``<Img> </Img>``, then the image, video and audio signals."""
    img = modality_registry.get("image")
    out = [img.open_token, img.close_token]
    for name in LEGACY_MODALITY_ORDER:
        if name in signal_counts:
            out += modality_registry.get(name).signal_tokens(int(signal_counts[name]))
    return out


def table_rows(layout) -> dict[str, tuple[str, int]]:
    """token -> (the NewTokenTable group holding it, its row there)."""
    rows = {t: ("markers", i) for i, t in enumerate(layout.markers)}
    rows.update({t: ("signals", i) for i, t in enumerate(layout.signals)})
    return rows


@dataclass
class Imported:
    state: dict[str, torch.Tensor]  # this project's parameter name -> tensor (the bundle's)
    base_rows: dict[str, torch.Tensor] | None  # "embed" / "head": the old vocabulary rows, when they moved
    report: dict[str, Any] = field(default_factory=dict)


def is_legacy_key(key: str) -> bool:
    """A key of the original's layout: one :func:`from_legacy` maps (or skips with a reason of that layout)."""
    return (
        key in EMBED_KEYS.values()
        or key in HEAD_KEYS.values()
        or key.startswith("llama_proj.")
        or _PROJ.match(key) is not None
        or _LORA.match(key) is not None
    )


def _lora_name(legacy_key: str) -> str | None:
    m = _LORA.match(legacy_key)
    return f"llm.{m['path']}.{m['ab']}.{DEFAULT_ADAPTER}.weight" if m else None


def _lora_layout_free(legacy_key: str) -> str:
    """A LoRA key without its adapter name: what the peft 0.3 and the older layout share."""
    m = _LORA.match(legacy_key)
    return f"{m['path']}.{m['ab']}" if m else legacy_key


def _projector_name(legacy_key: str) -> tuple[str, str] | None:
    m = _PROJ.match(legacy_key)
    if not m:
        return None
    modality = {v: k for k, v in PROJECTOR_PREFIX.items()}[m["prefix"]]
    rest = m["rest"]
    if rest == "query_embs":
        return modality, f"output_projectors.{modality}.queries"
    part, _, tail = rest.partition(".")
    if part not in PROJECTOR_PARTS:
        return modality, ""
    return modality, f"output_projectors.{modality}.{PROJECTOR_PARTS[part]}.{tail}"


def from_legacy(ckpt: Mapping[str, torch.Tensor], model, *, all_rows: bool = False) -> Imported:
    """Map every tensor of an original checkpoint onto ``model`` (a NextGPT, with LoRA applied when
    the checkpoint has LoRA tensors). Nothing is loaded into ``model``; ``Imported.state`` is.
    ``all_rows`` (``model.vocab_rows=all``): the old vocabulary rows are trained weights and are
    kept whether they moved or not; otherwise only when they moved."""
    own = dict(model.named_parameters())
    layout = model.layout
    base_vocab = int(layout.first_new_id)
    counts = {name: len(ids) for name, ids in layout.signal_ids.items()}
    mapped: dict[str, str] = {}
    skipped: dict[str, str] = {}
    state: dict[str, torch.Tensor] = {}
    peft = any(k.startswith("llama_model.base_model.") for k in ckpt)

    def put(ours: str, legacy: str, tensor: torch.Tensor) -> None:
        if ours not in own:
            skipped[legacy] = f"this model has no parameter {ours}"
            return
        if tuple(own[ours].shape) != tuple(tensor.shape):
            raise ConvertError(
                f"{legacy} {tuple(tensor.shape)} does not fit {ours} {tuple(own[ours].shape)}"
                + (
                    " (model.input_projector.num_tokens must be 1: the original's Linear(1024 -> 4096))"
                    if ours.startswith("input_projector")
                    else ""
                )
            )
        state[ours] = tensor.detach().clone()
        mapped[legacy] = ours

    for key, tensor in ckpt.items():
        if key in (EMBED_KEYS[peft], HEAD_KEYS[peft]):
            continue
        if key.startswith("llama_proj."):
            put("input_projector.proj." + key[len("llama_proj.") :], key, tensor)
        elif (proj := _projector_name(key)) is not None:
            modality, ours = proj
            if not ours:
                skipped[key] = (
                    "not a part of the transformer output projector (fc / tfm / model / query_embs)"
                )
            elif f"output_projectors.{modality}.in_fc.weight" not in own:
                skipped[key] = f"this model has no {modality} output projector (model.modalities.{modality})"
            else:
                put(ours, key, tensor.reshape(tensor.shape[1:]) if ours.endswith(".queries") else tensor)
        elif (lora_name := _lora_name(key)) is not None:
            if not any(".lora_" in n for n in own):
                raise ConvertError(
                    f"{key}: the checkpoint has LoRA tensors but the model has no LoRA (a stage-3 "
                    "checkpoint imports as a stage-3 bundle)"
                )
            put(lora_name, key, tensor)
        else:
            skipped[key] = "not a tensor the original's NextGPTModel trains or saves by name"

    embed, head = ckpt.get(EMBED_KEYS[peft]), ckpt.get(HEAD_KEYS[peft])
    base_rows = None
    rows_report: dict[str, Any] = {}
    if embed is None or head is None:
        missing = [k for k in (EMBED_KEYS[peft], HEAD_KEYS[peft]) if k not in ckpt]
        rows_report["missing"] = missing
    else:
        names = legacy_tokens(counts)
        if embed.shape[0] != base_vocab + len(names) or head.shape[0] != embed.shape[0]:
            raise ConvertError(
                f"{EMBED_KEYS[peft]} has {embed.shape[0]} rows and {HEAD_KEYS[peft]} "
                f"{head.shape[0]}; this model's base "
                f"vocabulary ({base_vocab}) plus the original's {len(names)} new tokens is {base_vocab + len(names)} "
                "(another base LLM, or other model.modalities.*.num_signal_tokens)"
            )
        where = table_rows(layout)
        new = {
            "markers": {"embed": model.new_tokens.markers.embed, "head": model.new_tokens.markers.head},
            "signals": {"embed": model.new_tokens.signals.embed, "head": model.new_tokens.signals.head},
        }
        tables = {g: {k: v.detach().clone() for k, v in parts.items()} for g, parts in new.items()}
        for j, token in enumerate(names):
            group, row = where[token]
            tables[group]["embed"][row] = embed[base_vocab + j].to(tables[group]["embed"].dtype)
            tables[group]["head"][row] = head[base_vocab + j].to(tables[group]["head"].dtype)
        for group, parts in tables.items():
            for part, tensor in parts.items():
                state[f"new_tokens.{group}.{part}"] = tensor
        mapped[EMBED_KEYS[peft]] = (
            f"new_tokens.*.embed (rows {base_vocab}..{embed.shape[0] - 1} by token name)"
        )
        mapped[HEAD_KEYS[peft]] = f"new_tokens.*.head (rows {base_vocab}..{head.shape[0] - 1} by token name)"
        not_in_ckpt = [t for t in where if t not in names]
        if not_in_ckpt:
            rows_report["new_tokens_not_in_checkpoint"] = not_in_ckpt
        base_embed = model.llm.get_input_embeddings().weight[:base_vocab].detach().float()
        base_head = model.llm.get_output_embeddings().weight[:base_vocab].detach().float()
        d_embed = (embed[:base_vocab].float() - base_embed).abs()
        d_head = (head[:base_vocab].float() - base_head).abs()
        rows_report.update(
            {
                "embed_max_abs_change": float(d_embed.max()),
                "head_max_abs_change": float(d_head.max()),
                "embed_rows_changed": int((d_embed.amax(-1) > 0).sum()),
                "head_rows_changed": int((d_head.amax(-1) > 0).sum()),
                "base_vocab": base_vocab,
            }
        )
        moved = rows_report["embed_rows_changed"] or rows_report["head_rows_changed"]
        rows_report["kept"] = bool(moved) or all_rows
        if rows_report["kept"]:
            base_rows = {
                "embed": embed[:base_vocab].detach().clone(),
                "head": head[:base_vocab].detach().clone(),
            }
    report = {
        "mapped": mapped,
        "skipped": skipped,
        "old_vocabulary_rows": rows_report,
        "peft_prefix": peft,
        "dtypes": {k: str(v.dtype).replace("torch.", "") for k, v in ckpt.items()},
        "keys": list(ckpt),
    }
    return Imported(state, base_rows, report)


def to_legacy(
    model, keys: list[str] | None = None, dtypes: Mapping[str, str] | None = None
) -> dict[str, torch.Tensor]:
    """The original's checkpoint of ``model`` (a NextGPT with its bundle loaded, so its LLM matrices
    hold any kept old rows). ``keys`` / ``dtypes``: those of the checkpoint it was imported from
    (the bundle's meta keeps them), so the round trip returns that checkpoint exactly; otherwise the
    original's full layout, with peft's prefix when the model has LoRA."""
    own = dict(model.named_parameters())
    layout = model.layout
    base_vocab = int(layout.first_new_id)
    has_lora = any(".lora_" in n for n in own)
    peft = has_lora if keys is None else any(k.startswith("llama_model.base_model.") for k in keys)
    counts = {name: len(ids) for name, ids in layout.signal_ids.items()}
    out: dict[str, torch.Tensor] = {}
    if model.input_projector.num_tokens != 1:
        raise ConvertError(
            f"model.input_projector.num_tokens={model.input_projector.num_tokens}: the original's input "
            "projector is one Linear(1024 -> 4096), one token per item"
        )
    out["llama_proj.weight"] = own["input_projector.proj.weight"]
    out["llama_proj.bias"] = own["input_projector.proj.bias"]
    inverse = {v: k for k, v in PROJECTOR_PARTS.items()}
    for modality, prefix in PROJECTOR_PREFIX.items():
        head = f"output_projectors.{modality}."
        for name, p in own.items():
            if not name.startswith(head):
                continue
            rest = name[len(head) :]
            if rest == "queries":
                out[f"{prefix}.0.query_embs"] = p.unsqueeze(0)
            else:
                part, _, tail = rest.partition(".")
                out[f"{prefix}.0.{inverse[part]}.{tail}"] = p
    where = table_rows(layout)
    tables = {"markers": model.new_tokens.markers, "signals": model.new_tokens.signals}
    names = legacy_tokens(counts)
    missing = [t for t in names if t not in where]
    if missing:
        raise ConvertError(
            f"the original's tokens {missing[:4]} are not in this model's vocabulary (model.markers=shared "
            "puts <Img> </Img> around every modality, as the original)"
        )
    kept = getattr(model, "base_rows", None) or {}  # a bundle's own old rows, in the dtype it stored them in
    for part, matrix, keymap in (
        ("embed", model.llm.get_input_embeddings().weight, EMBED_KEYS),
        ("head", model.llm.get_output_embeddings().weight, HEAD_KEYS),
    ):
        old = (
            kept[part] if part in kept else matrix[:base_vocab]
        )  # not the LLM's copy: a bf16 LLM rounds fp16 rows
        rows = [getattr(tables[where[t][0]], part)[where[t][1]].to(old.dtype) for t in names]
        out[keymap[peft]] = torch.cat([old.to(matrix.device), torch.stack(rows)])
    given = {_lora_layout_free(k): k for k in keys or () if _LORA.match(k)}
    for name, p in own.items():
        if f".lora_A.{DEFAULT_ADAPTER}." in name or f".lora_B.{DEFAULT_ADAPTER}." in name:
            key = "llama_model." + name[len("llm.") :]  # peft 0.3's layout, as the original saves it
            out[given.get(_lora_layout_free(key), key)] = p
    if keys is not None:
        lost = [k for k in keys if k not in out]
        if lost:
            raise ConvertError(
                f"the bundle can not give back {lost[:4]} of the checkpoint it was imported from"
            )
        out = {k: out[k] for k in keys}
    result = {}
    for k, v in out.items():
        dtype = getattr(torch, dtypes[k]) if dtypes and k in dtypes else v.dtype
        result[k] = v.detach().to(dtype).contiguous().clone()
    return result
