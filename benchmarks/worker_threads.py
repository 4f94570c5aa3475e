"""Threads per test worker: two processes training a small model side by side on this machine, each
with torch's default thread count and each with an equal share of the cores (what
``tests/conftest.py`` sets under pytest-xdist). On 2 cores, two workers of two threads each oversubscribe
the cores and OpenMP's barriers spin against each other.

    .venv/bin/python benchmarks/worker_threads.py [--steps 1500] [--procs 2]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import torch

LOOP = """
import sys, torch
torch.set_num_threads(int(sys.argv[1]))
torch.manual_seed(0)
m = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 256))
opt = torch.optim.AdamW(m.parameters())
x = torch.randn(32, 256)
for _ in range(int(sys.argv[2])):
    loss = m(x).pow(2).mean(); opt.zero_grad(); loss.backward(); opt.step()
"""


def side_by_side(procs: int, threads: int, steps: int) -> float:
    """Wall seconds for ``procs`` processes of the loop, started together, each on ``threads`` threads."""
    start = time.perf_counter()
    running = [subprocess.Popen([sys.executable, "-c", LOOP, str(threads), str(steps)]) for _ in range(procs)]
    for p in running:
        if p.wait():
            raise SystemExit(f"the training loop failed (exit {p.returncode})")
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--procs", type=int, default=2, help="processes side by side (pytest-xdist workers)")
    args = p.parse_args()
    cores = os.cpu_count() or 1
    default, share = torch.get_num_threads(), max(1, cores // args.procs)
    print(f"{cores} cores, {args.procs} processes side by side, {args.steps} AdamW steps each")
    for threads in (default, share, default, share):
        print(f"  {threads} thread(s) each: {side_by_side(args.procs, threads, args.steps):6.1f} s")


if __name__ == "__main__":
    main()
