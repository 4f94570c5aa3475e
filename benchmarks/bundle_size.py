"""Stage-bundle size against the full model, for the legacy 7B layout (built on the meta device,
nothing loaded or allocated) and for the tiny demo bundles on disk.

    .venv/bin/python benchmarks/bundle_size.py [--bundles bundles]

The 7B numbers below are Vicuna-7B's and the legacy decoders' published configs;
the model code itself reads them from the loaded configs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from nextgpt.encoders.imagebind import ImageBindModel
from nextgpt.encoders.imagebind_config import ImageBindConfig
from nextgpt.model import NextGPT
from nextgpt.model_spec import LoraSpec, OutputProjectorSpec
from nextgpt.stages import STAGES
from nextgpt.tokens import TokenLayout

VICUNA_7B = dict(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    tie_word_embeddings=False,
)
LEGACY_DECODERS = {
    "image": (77, 768),
    "audio": (1, 512),
    "video": (77, 1024),
}  # SD 1.5, AudioLDM-l, ZeroScope
SIGNALS = {"image": 4, "audio": 8, "video": 24}


def legacy_7b(stage: int) -> NextGPT:
    with torch.device("meta"):
        llm = LlamaForCausalLM(LlamaConfig(**VICUNA_7B)).to(torch.bfloat16)
        encoder = ImageBindModel(ImageBindConfig.huge()).to(torch.float16)
        first, ids = VICUNA_7B["vocab_size"], iter(range(VICUNA_7B["vocab_size"], 10**6))
        markers = {m: (next(ids), next(ids)) for m in SIGNALS}
        signals = {m: tuple(next(ids) for _ in range(n)) for m, n in SIGNALS.items()}
        layout = TokenLayout(
            first,
            tuple(f"m{i}" for i in range(6)),
            tuple(f"s{i}" for i in range(sum(SIGNALS.values()))),
            markers,
            signals,
        )
        model = NextGPT(
            llm,
            encoder,
            layout,
            num_media_tokens=1,
            output_shapes=LEGACY_DECODERS,
            output_projector=OutputProjectorSpec.of(
                dict(
                    d_model=512,
                    nhead=4,
                    num_encoder_layers=4,
                    num_decoder_layers=4,
                    dim_feedforward=2048,
                    dropout=0.1,
                )
            ),
        )
        if STAGES[stage].use_lora:
            model.apply_lora(
                LoraSpec(r=32, alpha=32, dropout=0.1, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"))
            )
    model.set_trainable(STAGES[stage].trainable_groups)
    return model


def nbytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundles", default="bundles")
    args = ap.parse_args()
    print("legacy NExT-GPT 7B (Vicuna-7B bf16 + ImageBind-huge fp16 + projectors fp32), meta device:")
    print(
        f"{'stage':>5} {'trainable':>14} {'bundle params':>14} {'bundle MB':>10} {'full model GB':>14} {'ratio':>8}"
    )
    carried: set[str] = set()
    for stage in (1, 2, 3):
        model = legacy_7b(stage)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        # a bundle keeps what its stage trained plus what it carried from the previous bundle
        carried |= {n for n, p in model.named_parameters() if p.requires_grad}
        in_bundle = [p for n, p in model.named_parameters() if n in carried]
        bundle_bytes = sum(p.numel() * 4 for p in in_bundle)  # bundles store fp32
        full = nbytes(model.parameters())
        print(
            f"{stage:>5} {trainable:>14,} {sum(p.numel() for p in in_bundle):>14,} {bundle_bytes / 2**20:>10.1f} "
            f"{full / 2**30:>14.2f} {bundle_bytes / full:>8.2%}"
        )
    for stage in (1, 2, 3):
        meta_path = Path(args.bundles) / f"stage{stage}" / "meta.json"
        if meta_path.is_file():
            meta = json.loads(meta_path.read_text())
            print(
                f"tiny stage {stage} bundle on disk: {meta['bytes'] / 1024:.0f} KiB, {meta['params']:,} of "
                f"{meta['full_model_params']:,} params ({meta['params'] / meta['full_model_params']:.1%})"
            )


if __name__ == "__main__":
    main()
