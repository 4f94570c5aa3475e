"""Packed vs padded batches (``dataset.pack``): the padding fraction and the training tokens/s.

For the stage-1 and stage-2 samples of the synthetic data and (when present) the real sample
folder's captions, batches of ``--batch`` samples are built both ways from the same samples; the
padding fraction is the share of positions that hold no token. Then one stage-1 step (forward and
backward) of a mid-size Llama (4 layers, width 256, the tiny tokenizer) runs on each batch, and the
tokens/s of real (non-padding) tokens is compared, in one run on this machine.

    .venv/bin/python benchmarks/packing.py [--batch 16] [--sample ../shared/data/nextgpt_sample]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def mid_llm(out: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    from nextgpt.tiny.tokenizers import build_llm_tokenizer

    tok = build_llm_tokenizer(0)
    torch.manual_seed(0)
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok),
            hidden_size=256,
            intermediate_size=688,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=1024,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
    ).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def items_for(cfg, module, sources, limit: int) -> list:
    from datamodules.nextgpt_layout import read_source
    from nextgpt.batch import ConversationDataset, Item

    convs = []
    for name, modality, root in sources:
        found, _ = read_source(name, modality, root, cfg.stage.objective)
        convs += found
    random.Random(0).shuffle(convs)
    ds = ConversationDataset(
        convs[:limit],
        module.tokenizer,
        module.model.layout,
        cfg.dataset.template,
        int(cfg.model.input_projector.num_tokens),
        int(cfg.dataset.max_length),
    )
    return [it for it in (ds[i] for i in range(len(ds))) if isinstance(it, Item)]


def batches(items, size: int):
    return [items[k : k + size] for k in range(0, len(items) - size + 1, size)]


def step_seconds(module, batch, reps: int) -> float:
    times = []
    for _ in range(reps):
        module.model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        module.compute_loss(batch)["loss"].backward()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    from nextgpt.batch import Collator
    from nextgpt.config import compose
    from nextgpt.stages import STAGES
    from nextgpt.tiny import build_all
    from nextgpt.world.synthetic import write_synthetic

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--batches", type=int, default=4, help="batches timed per data set and stage")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument(
        "--sample",
        type=Path,
        default=Path(
            os.environ.get("NEXTGPT_SAMPLE_DATA", ROOT.parent / "shared" / "data" / "nextgpt_sample")
        ),
    )
    args = p.parse_args()
    cache = ROOT / ".cache"
    build_all(cache / "tiny_backbones")
    write_synthetic(cache / "synthetic", num_per_modality=24, seed=0)
    sets = {
        "synthetic": [
            ("synthetic_image", "image", cache / "synthetic" / "synthetic_image"),
            ("synthetic_audio", "audio", cache / "synthetic" / "synthetic_audio"),
            ("synthetic_video", "video", cache / "synthetic" / "synthetic_video"),
        ]
    }
    if args.sample.is_dir():
        sets["sample captions"] = [
            (n, m, args.sample / n)
            for n, m in (("cc3m", "image"), ("audiocap", "audio"), ("webvid", "video"))
            if (args.sample / n).is_dir()
        ]
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        llm = mid_llm(Path(tmp) / "llm")
        for stage in (1, 2):
            cfg = compose(
                [
                    f"stage={stage}",
                    f"paths.cache_dir={cache}",
                    f"model.llm.path={llm}",
                    "logger=csv",
                    "model.output_projector.dropout=0.0",
                ],
                output_dir=tmp,
            )
            from omegaconf import OmegaConf

            module = STAGES[stage](
                model=OmegaConf.to_container(cfg.model, resolve=True),
                optim=OmegaConf.to_container(cfg.stage.optim, resolve=True),
                loss=OmegaConf.to_container(cfg.stage.loss),
            )
            module.configure_model()
            module.model.train()
            pad, n = module.tokenizer.pad_token_id, int(cfg.model.input_projector.num_tokens)
            for set_name, sources in sets.items():
                items = items_for(cfg, module, sources, args.batch * args.batches)
                result = {"stage": stage, "data": set_name}
                for mode, collate in (
                    ("padded", Collator(pad, n)),
                    ("packed", Collator(pad, n, pack_length=int(cfg.dataset.max_length))),
                ):
                    built = [collate(b) for b in batches(items, args.batch)]
                    tokens = sum(int(b["input_ids"].numel() * (1 - b["padding"])) for b in built)
                    step_seconds(module, built[0], 1)  # warm-up
                    seconds = sum(step_seconds(module, b, args.reps) for b in built)
                    result[mode] = {
                        "padding": statistics.mean(b["padding"] for b in built),
                        "rows": statistics.mean(b["input_ids"].shape[0] for b in built),
                        "positions": statistics.mean(b["input_ids"].numel() for b in built),
                        "tokens_per_s": tokens / seconds,
                    }
                rows.append(result)
    print(
        f"packed vs padded batches of {args.batch} samples, a stage step of a 4-layer width-256 Llama, "
        f"{os.cpu_count()} CPUs (one run)"
    )
    print(
        f"{'stage':>5} {'data':16s} {'padding':>9} {'packed':>8} {'rows':>9} {'positions':>15} {'tok/s pad':>10} "
        f"{'tok/s pack':>10} {'ratio':>6}"
    )
    for r in rows:
        a, b = r["padded"], r["packed"]
        print(
            f"{r['stage']:>5} {r['data']:16s} {a['padding']:9.1%} {b['padding']:8.1%} "
            f"{a['rows']:4.0f}->{b['rows']:<4.1f} "
            f"{a['positions']:7.0f}->{b['positions']:<7.0f} {a['tokens_per_s']:10,.0f} {b['tokens_per_s']:10,.0f} "
            f"{b['tokens_per_s'] / a['tokens_per_s']:6.2f}"
        )


if __name__ == "__main__":
    main()
