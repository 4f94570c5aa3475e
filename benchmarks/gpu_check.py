"""The GPU check of every stage under every strategy, on one GPU, within a time budget.

Each run is `python train.py stage=S strategy=X trainer=gpu trainer.devices=1 ...` for a few dozen
steps, on the tiny model and on a mid-size one (a ~1B-parameter Llama with random weights built
from a config, bf16, with the tiny encoder and decoders). Runs go in priority order and stop when
the budget is spent; each prints loss, peak GPU memory and median step time, and a table of all
of them goes to ``--out`` (results.json, results.md, one log per run).

On the device machine (torch, transformers, peft and lightning are there; the rest travels as
wheels that `bash scripts/gpu_wheels.sh` puts into .whl/ here):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \\
        .whl/*.whl && export PYTHONPATH=/tmp/site && PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --out $OUT

Without CUDA it refuses, unless ``--cpu`` (a dry run of the driver itself: single-device and
2-process CPU strategies only).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GPU_STRATEGIES = ["auto", "ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero2_offload", "deepspeed_zero3"]
CPU_STRATEGIES = ["auto", "ddp", "fsdp"]
MID = {
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 20,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
}  # ~1.0B parameters with the tiny tokenizer's vocabulary


def build_mid_llm(cache: Path) -> Path:
    """A ~1B Llama with random weights (bf16) and the tiny LLM's tokenizer, saved like a real one."""
    out = cache / "gpu_check" / "llm_1b"
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tiny = cache / "tiny_backbones" / "llm"
    tok = AutoTokenizer.from_pretrained(tiny)
    base = LlamaConfig.from_pretrained(tiny)
    cfg = LlamaConfig(**{**base.to_dict(), **MID, "vocab_size": base.vocab_size, "torch_dtype": "bfloat16"})
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out)
    print(
        f"built the mid-size LLM: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters -> {out}"
    )
    return out


def plan(strategies: list[str], mid: bool) -> list[tuple[str, int, str]]:
    """(model, stage, strategy) in priority order: the single-device chains first (their bundles
    start the other runs), then stage 3 (every trainable group) under each strategy, then the rest."""
    runs = [("tiny", s, "auto") for s in (1, 2, 3)]
    runs += [("tiny", 3, x) for x in strategies if x != "auto"]
    if mid:
        runs += [("mid", s, "auto") for s in (1, 2, 3)]
        runs += [
            ("mid", 3, x)
            for x in ("fsdp", "deepspeed_zero3", "deepspeed_zero2_offload", "deepspeed_zero2", "ddp")
            if x in strategies
        ]
        runs += [("mid", 1, x) for x in ("fsdp", "deepspeed_zero3") if x in strategies]
    runs += [("tiny", s, x) for s in (2, 1) for x in strategies if x != "auto"]
    return runs


def run_one(
    model: str, stage: int, strategy: str, args, cache: Path, mid_llm: Path | None, work: Path, timeout: float
) -> dict:
    root = work / f"{model}_{strategy}"  # one root per model x strategy: stage N starts from its stage N-1
    init = work / f"{model}_auto" / "bundles" / f"stage{stage - 1}"
    timer = root / f"stage{stage}_steps.jsonl"
    timer.unlink(missing_ok=True)
    steps = args.steps if stage != 2 or model == "tiny" else max(5, args.steps // 3)
    cmd = [
        sys.executable,
        "train.py",
        f"stage={stage}",
        f"strategy={strategy}",
        f"trainer.max_steps={steps}",
        "trainer.max_epochs=-1",
        "logger=csv",
        "callbacks.generation_samples=null",
        "callbacks.model_checkpoint=null",
        f"paths.root={root}",
        f"paths.cache_dir={cache}",
        "print_config=false",
        f"stage.batch_size={args.batch}",
        "+callbacks.timer._target_=callbacks.step_timer.StepTimer",
        f"+callbacks.timer.path={timer}",
    ]
    cmd += (
        ["trainer.accelerator=cpu", "trainer.devices=2" if strategy != "auto" else "trainer.devices=1"]
        if args.cpu
        else ["trainer=gpu", "trainer.devices=1"]
    )
    if stage > 1:
        cmd.append(f"init_from={init}")
    if model == "mid":
        cmd += [f"model.llm.path={mid_llm}", "model.llm.dtype=bfloat16"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    log = work / f"{model}_stage{stage}_{strategy}.log"
    try:
        res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=timeout)
        rc, output = res.returncode, res.stdout + res.stderr
    except subprocess.TimeoutExpired as e:
        text = lambda b: b.decode(errors="replace") if isinstance(b, bytes) else (b or "")  # noqa: E731
        rc, output = "timeout", text(e.stdout) + text(e.stderr)
    log.write_text(output)
    row = {
        "model": model,
        "stage": stage,
        "strategy": strategy,
        "rc": rc,
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    if timer.is_file():
        rows = [json.loads(line) for line in timer.read_text().splitlines()]
        times = [r["seconds"] for r in rows[2:]] or [r["seconds"] for r in rows]
        row.update(
            steps=len(rows),
            step_ms=round(1000 * statistics.median(times), 1),
            loss=next((round(r["loss"], 4) for r in reversed(rows) if "loss" in r), None),
            peak_gib=round(max((r.get("peak_gib", 0.0) for r in rows), default=0.0), 2),
        )
    if rc != 0:
        tail = [line for line in str(output).splitlines() if line.strip()][-3:]
        row["error"] = " | ".join(tail)[-400:]
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "outputs/gpu_check"))
    ap.add_argument("--budget", type=float, default=420.0, help="seconds; no run starts after it is spent")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--no-mid", action="store_true", help="skip the ~1B model")
    ap.add_argument(
        "--cpu", action="store_true", help="dry run without CUDA (auto, ddp, fsdp on 2 CPU processes)"
    )
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available() and not args.cpu:
        sys.exit("no CUDA device: the GPU check needs one (--cpu runs the driver on the CPU strategies)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    from nextgpt.tiny import build_all
    from nextgpt.world.synthetic import write_synthetic

    cache = REPO / ".cache"
    build_all(cache / "tiny_backbones")
    write_synthetic(cache / "synthetic", num_per_modality=24, seed=0)
    mid_llm = None if args.no_mid else build_mid_llm(cache)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    print(
        f"device {device}; torch {torch.__version__}; budget {args.budget:.0f} s; setup "
        f"{time.perf_counter() - start:.0f} s"
    )
    work = REPO / "outputs" / "gpu_check_runs"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    results, skipped = [], []
    for model, stage, strategy in plan(CPU_STRATEGIES if args.cpu else GPU_STRATEGIES, mid_llm is not None):
        left = args.budget - (time.perf_counter() - start)
        if left < 20:
            skipped.append(f"{model} stage {stage} {strategy}")
            continue
        row = run_one(model, stage, strategy, args, cache, mid_llm, work, timeout=left)
        results.append(row)
        print(json.dumps(row), flush=True)
    table = [
        "| model | stage | strategy | result | steps | loss | peak GiB | ms/step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        table.append(
            f"| {r['model']} | {r['stage']} | {r['strategy']} | "
            f"{'ok' if r['rc'] == 0 else 'FAILED: ' + r.get('error', '')} "
            f"| {r.get('steps', '')} | {r.get('loss', '')} | {r.get('peak_gib', '')} | {r.get('step_ms', '')} |"
        )
    summary = {
        "device": device,
        "torch": torch.__version__,
        "results": results,
        "skipped": skipped,
        "seconds": round(time.perf_counter() - start, 1),
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    (out / "results.md").write_text(
        "\n".join(table) + ("\n\nnot run (budget): " + ", ".join(skipped) if skipped else "") + "\n"
    )
    for log in sorted(work.glob("*.log"))[:6]:  # the first logs travel back (the device tool returns 8 files)
        if any(
            r["rc"] != 0 and log.name.startswith(f"{r['model']}_stage{r['stage']}_{r['strategy']}")
            for r in results
        ):
            shutil.copy(log, out / log.name)
    print("\n".join(table))
    if skipped:
        print("not run (budget):", ", ".join(skipped))


if __name__ == "__main__":
    main()
