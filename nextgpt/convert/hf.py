"""A stage bundle as a Hugging Face folder: LoRA merged into the LLM, the new tokens in its
vocabulary, the projectors beside it.

``<out>/llm/``: ``save_pretrained`` of the merged causal LM with its embedding and LM-head
matrices resized to the extended vocabulary (new rows at the tokenizer's ids), and the tokenizer
with NExT-GPT's tokens; ``AutoModelForCausalLM.from_pretrained(<out>/llm)`` loads it anywhere.
``<out>/nextgpt_projectors.safetensors``: input and output projectors and the new-token rows.
``<out>/README.md``: a short model card. ``<out>/nextgpt.json``: what a NextGPT needs to use them.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, TypedDict

import torch
from safetensors.torch import save_file

from nextgpt.bundles import BundleMeta
from nextgpt.model_spec import ModelSpec


def merged_llm(model):
    """The LLM with LoRA merged (a copy when it carries adapters) and the new tokens' rows written
    into resized matrices, at their tokenizer ids."""
    llm = model.llm
    if hasattr(llm, "merge_and_unload"):  # a peft model: merge into a copy, keep the trained model as it is
        llm = copy.deepcopy(llm).merge_and_unload()
    else:
        llm = copy.deepcopy(llm)
    layout = model.layout
    llm.resize_token_embeddings(layout.vocab_size)
    rows = {
        "embed": torch.cat([model.new_tokens.markers.embed, model.new_tokens.signals.embed]),
        "head": torch.cat([model.new_tokens.markers.head, model.new_tokens.signals.head]),
    }
    first = layout.first_new_id
    with torch.no_grad():
        emb = llm.get_input_embeddings().weight
        emb[first:] = rows["embed"].to(emb.dtype)
        head = llm.get_output_embeddings().weight
        if head.data_ptr() != emb.data_ptr():  # untied
            head[first:] = rows["head"].to(head.dtype)
    llm.config.vocab_size = layout.vocab_size
    return llm


class ExportInfo(TypedDict):
    """``nextgpt.json`` of an export: the new tokens' ids, the projectors' settings, the template."""

    first_new_id: int
    markers: list[str]
    signals: list[str]
    signal_ids: dict[str, list[int]]
    marker_ids: dict[str, list[int]]
    input_projector: dict[str, int]
    output_projector: dict[str, Any]
    template: str
    stage: int | None


def export_hf(model, tokenizer, spec: ModelSpec, meta: BundleMeta, out: str | Path) -> Path:
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; give a new folder (nothing is overwritten)")
    out.mkdir(parents=True, exist_ok=True)
    llm = merged_llm(model)
    llm.save_pretrained(out / "llm", safe_serialization=True)
    tokenizer.save_pretrained(out / "llm")
    keep = ("input_projector.", "output_projectors.", "new_tokens.")
    state = {n: p.detach().contiguous() for n, p in model.named_parameters() if n.startswith(keep)}
    save_file(state, str(out / "nextgpt_projectors.safetensors"))
    layout = model.layout
    info: ExportInfo = {
        "first_new_id": layout.first_new_id,
        "markers": list(layout.markers),
        "signals": list(layout.signals),
        "signal_ids": {m: list(ids) for m, ids in layout.signal_ids.items()},
        "marker_ids": {m: list(ids) for m, ids in layout.marker_ids.items()},
        "input_projector": {"num_tokens": model.input_projector.num_tokens},
        "output_projector": spec.output_projector.as_dict(),
        "template": spec.llm.template,
        "stage": meta.get("stage"),
    }
    (out / "nextgpt.json").write_text(json.dumps(info, indent=2, default=str))
    (out / "README.md").write_text(_card(spec, meta, info, sum(t.numel() for t in state.values())))
    return out


def _card(spec: ModelSpec, meta: BundleMeta, info: ExportInfo, n_proj: int) -> str:
    decoders = {m: dec.path for m, dec in spec.generated.items()}
    return "\n".join(
        [
            f"# NExT-GPT ({spec.name}), stage {meta.get('stage', '?')}",
            "",
            "Exported by `python -m nextgpt.convert to_hf` (nextgpt-lightning).",
            "",
            "- `llm/`: the causal LM with LoRA merged and NExT-GPT's new tokens in its vocabulary "
            f"(ids {info['first_new_id']}..{info['first_new_id'] + len(info['markers']) + len(info['signals']) - 1}); "
            "`AutoModelForCausalLM.from_pretrained('llm')`, `AutoTokenizer.from_pretrained('llm')`.",
            f"- `nextgpt_projectors.safetensors`: input and output projectors and the new-token "
            f"rows ({n_proj:,} parameters).",
            f"- `nextgpt.json`: token ids, projector settings, prompt template `{info['template']}`.",
            "",
            f"Base LLM: `{spec.llm.path}`. Encoder: ImageBind `{spec.encoder.checkpoint}`.",
            "Decoders (frozen, not included): " + ", ".join(f"{m}: `{p}`" for m, p in decoders.items()) + ".",
            "",
            "Text only needs `llm/`; media in and out need the projectors, ImageBind and the decoders "
            "(`python -m nextgpt.generate --bundle <the stage bundle>`).",
            "",
        ]
    )
