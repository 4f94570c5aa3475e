"""Our stage step against a bare PyTorch loop on the same model, and memory with and without
activation checkpointing, in one run.

The model is a stage-1 NextGPT over a mid-size Llama (4 layers, width 256, the tiny tokenizer).
"ours" is ``Trainer.fit`` of the stage's LightningModule for ``--steps`` steps on a fixed batch
(every modality's path, the step-level loss normalisation, logging); "bare" is a plain loop on the
same weights: the LLM on the embedded inputs, cross-entropy on the labels, backward, AdamW over the
same trainable tensors. Then the memory a forward keeps (glibc allocator counters) with and
without ``model.llm.activation_checkpointing`` and the step time of both.

    .venv/bin/python benchmarks/stage_overhead.py [--steps 20]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build(cfg):
    from omegaconf import OmegaConf

    from nextgpt.stages import STAGES

    module = STAGES[int(cfg.stage.number)](
        model=OmegaConf.to_container(cfg.model, resolve=True),
        optim=OmegaConf.to_container(cfg.stage.optim, resolve=True),
        loss=OmegaConf.to_container(cfg.stage.loss),
    )
    module.configure_model()
    return module


def bare_seconds(module, batch, steps: int) -> float:
    import torch.nn.functional as F

    model = module.model
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    labels = batch["labels"]
    start = None
    for k in range(steps + 1):
        if k == 1:
            start = time.perf_counter()  # the first step warms up
        embeds = model.embed_inputs(
            batch["input_ids"], batch["media_mask"], batch["media"], batch["media_sequence"]
        )
        out = model.llm(
            inputs_embeds=embeds,
            attention_mask=batch["attention_mask"],
            use_cache=False,
            output_hidden_states=True,
        )
        logits = model.new_tokens.logits(out.hidden_states[-1], out.logits)
        loss = F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
        )
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return (time.perf_counter() - start) / steps


def ours_seconds(module, batch, steps: int) -> float:
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    class Clock(Callback):
        def __init__(self):
            self.start = None

        def on_train_batch_start(self, trainer, *_):
            if trainer.global_step == 1 and self.start is None:
                self.start = time.perf_counter()

    clock = Clock()
    loader = torch.utils.data.DataLoader([batch] * (steps + 1), batch_size=None, collate_fn=lambda b: b)
    trainer = L.Trainer(
        max_steps=steps + 1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[clock],
        num_sanity_val_steps=0,
    )
    trainer.fit(module, train_dataloaders=loader)
    return (time.perf_counter() - clock.start) / steps


def main() -> None:
    from benchmarks.packing import items_for, mid_llm
    from nextgpt.batch import Collator
    from nextgpt.checkpointing import memory_kept_by
    from nextgpt.config import compose
    from nextgpt.tiny import build_all
    from nextgpt.world.synthetic import write_synthetic

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=16)
    args = p.parse_args()
    cache = ROOT / ".cache"
    build_all(cache / "tiny_backbones")
    write_synthetic(cache / "synthetic", num_per_modality=24, seed=0)
    sources = [
        (f"synthetic_{m}", m, cache / "synthetic" / f"synthetic_{m}") for m in ("image", "audio", "video")
    ]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        llm = mid_llm(Path(tmp) / "llm")
        for ckpt in (False, True):
            cfg = compose(
                [
                    "stage=1",
                    f"paths.cache_dir={cache}",
                    f"model.llm.path={llm}",
                    "logger=csv",
                    f"model.llm.activation_checkpointing={str(ckpt).lower()}",
                ],
                output_dir=tmp,
            )
            module = build(cfg)
            module.model.train()
            items = items_for(cfg, module, sources, args.batch)
            batch = Collator(module.tokenizer.pad_token_id, int(cfg.model.input_projector.num_tokens))(items)
            module.compute_loss(batch)
            _, kept = memory_kept_by(lambda module=module, batch=batch: module.compute_loss(batch)["loss"])
            row = {
                "kept_mib": kept / 2**20 if kept is not None else float("nan"),
                "ours_s": ours_seconds(module, batch, args.steps),
            }
            if not ckpt:
                row["bare_s"] = bare_seconds(build(cfg).train(), batch, args.steps)
            results[ckpt] = row
    plain, ck = results[False], results[True]
    print(
        f"stage-1 step of a 4-layer width-256 Llama, batch {args.batch}, {args.steps} steps, {os.cpu_count()} CPUs "
        f"(one run)"
    )
    print(f"  bare PyTorch loop                 {plain['bare_s'] * 1e3:8.1f} ms/step")
    print(
        f"  our stage (Trainer.fit)           {plain['ours_s'] * 1e3:8.1f} ms/step   ratio "
        f"{plain['ours_s'] / plain['bare_s']:.2f}"
    )
    print(
        f"  our stage, checkpointing          {ck['ours_s'] * 1e3:8.1f} ms/step   ratio "
        f"{ck['ours_s'] / plain['ours_s']:.2f}"
    )
    print(
        f"  memory a forward keeps            {plain['kept_mib']:8.1f} MiB, checkpointed {ck['kept_mib']:.1f} MiB "
        f"(ratio {ck['kept_mib'] / plain['kept_mib']:.2f})"
    )


if __name__ == "__main__":
    main()
