"""Step time of 2-process DDP against 1 process on the same global batch (CPU, gloo), and what
running every modality's modules on every step costs (the design that lets DDP skip its
unused-parameter search) against that search (`find_unused_parameters=true`).

    .venv/bin/python benchmarks/ddp_step.py [--stage 3] [--steps 12] [--batch 4]

All runs use the tiny models and the synthetic data (built on first use), in one invocation, so
the ratios compare like with like on this noisy machine; absolute times are CPU times of a toy.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def timed_run(root: Path, cache: Path, stage: int, steps: int, *args: str) -> list[float]:
    """Per-step wall times (s) of `python train.py ...`, from the StepTimer callback."""
    times = root / "steps.jsonl"
    cmd = [
        sys.executable,
        "train.py",
        f"stage={stage}",
        f"trainer.max_steps={steps}",
        "trainer.max_epochs=-1",
        "logger=csv",
        "callbacks.generation_samples=null",
        "callbacks.model_checkpoint=null",
        f"paths.root={root}",
        f"paths.cache_dir={cache}",
        "print_config=false",
        "+callbacks.timer._target_=callbacks.step_timer.StepTimer",
        f"+callbacks.timer.path={times}",
        *args,
    ]
    if stage > 1:
        cmd.append(f"init_from={cache / 'bench_init' / 'bundles' / f'stage{stage - 1}'}")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false"}
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    if res.returncode:
        sys.exit(f"run failed ({' '.join(args)}):\n{res.stderr[-3000:]}")
    return [json.loads(line)["seconds"] for line in times.read_text().splitlines()]


def init_bundles(cache: Path, stage: int) -> None:
    """Bundles of the earlier stages for the stage under test to start from (one step each)."""
    root = cache / "bench_init"
    for s in range(1, stage):
        if not (root / "bundles" / f"stage{s}" / "meta.json").is_file():
            timed_run(root, cache, s, 1, "stage.batch_size=2")


def zero_row_cost(stage: int, batch: int, repeats: int) -> tuple[float, float]:
    """Median forward+backward seconds with every modality's modules running (zero rows where a
    batch lacks them) and with only the batch's own, on batches that lack modalities."""
    from omegaconf import OmegaConf

    from datamodules.nextgpt_layout import read_source
    from nextgpt.batch import collate_conversations
    from nextgpt.config import compose
    from nextgpt.stages import STAGES
    from nextgpt.tiny import build_all
    from nextgpt.world.synthetic import write_synthetic

    cache = REPO / ".cache"
    build_all(cache / "tiny_backbones")
    write_synthetic(cache / "synthetic", num_per_modality=24, seed=0)
    cfg = compose(
        [f"stage={stage}", f"paths.cache_dir={cache}", "model.output_projector.dropout=0"],
        output_dir=tempfile.mkdtemp(),
    )
    module = STAGES[stage](
        model=OmegaConf.to_container(cfg.model, resolve=True),
        optim=OmegaConf.to_container(cfg.stage.optim, resolve=True),
        loss=OmegaConf.to_container(cfg.stage.loss, resolve=True),
    )
    module.configure_model()
    src = cfg.dataset.sources[0]  # one modality per batch: the other modalities are absent
    convs, _ = read_source(src.name, src.modality, src.root, cfg.stage.objective)
    batch = collate_conversations(
        convs[:batch],
        module.tokenizer,
        module.model.layout,
        cfg.dataset.template,
        num_media_tokens=int(cfg.model.input_projector.num_tokens),
        max_length=512,
    )
    module.model.train()
    out = {}
    for every in (True, False):
        times = []
        for i in range(repeats + 3):
            module.model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            res = module.model(**batch, every_modality=every)
            loss = res.logits.float().mean() + sum(c.float().sum() for c in res.conditioning.values())
            loss.backward()
            if i >= 3:
                times.append(time.perf_counter() - t0)
        out[every] = statistics.median(times)
    return out[True], out[False]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stage", type=int, default=3)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=4, help="per-device batch of the 2-process runs")
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    cache = REPO / ".cache"
    init_bundles(cache, args.stage)
    ddp = ["strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu", f"stage.batch_size={args.batch}"]
    runs = {
        f"1 process, batch {2 * args.batch}": [f"stage.batch_size={2 * args.batch}"],
        f"DDP 2 x {args.batch} (every module each step)": ddp,
        f"DDP 2 x {args.batch}, find_unused_parameters=true": [
            *ddp,
            "trainer.strategy.find_unused_parameters=true",
        ],
        f"FSDP2 2 x {args.batch}": [
            "strategy=fsdp",
            "trainer.devices=2",
            "trainer.accelerator=cpu",
            f"stage.batch_size={args.batch}",
        ],
    }
    print(
        f"stage {args.stage}, {args.steps} steps per run (median of steps 3..), global batch {2 * args.batch}, "
        f"{os.cpu_count()} CPU cores"
    )
    medians = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, extra) in enumerate(runs.items()):
            steps = timed_run(Path(tmp) / f"run{i}", cache, args.stage, args.steps, *extra)
            medians[name] = statistics.median(steps[2:])
            print(f"  {name:48s} {medians[name] * 1000:8.1f} ms/step")
    names = list(medians)
    print(f"DDP / 1 process: x{medians[names[1]] / medians[names[0]]:.2f} step time")
    print(
        f"find_unused_parameters=true / every module each step: x{medians[names[2]] / medians[names[1]]:.2f}"
    )
    every, only = zero_row_cost(args.stage, args.batch, args.repeats)
    print(
        f"forward+backward on one-modality batches of {args.batch}: every modality's modules {every * 1000:.1f} ms, "
        f"only the batch's {only * 1000:.1f} ms (zero-row calls cost x{every / only:.3f})"
    )


if __name__ == "__main__":
    main()
