"""Latency and throughput of ``python -m nextgpt.serve`` under the official ``openai`` client.

Starts the server on a bundle (a subprocess, as a user runs it), then sends the same requests at
concurrency 1 and at concurrency 8 and prints, per request kind, requests/s and the p50 / p95
latency. Two kinds: a text answer about an uploaded image (the LLM only) and an image generated
on request (the LLM, then the decoder).

    .venv/bin/python benchmarks/serve_load.py --bundle bundles/stage3 [--requests 24]

The server runs one request at a time on purpose (no mixing), so at concurrency 8 throughput
stays the single-stream figure while latency grows with the queue: the ratio shows it.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def start_server(bundle: Path, port: int, out: Path) -> subprocess.Popen:
    import httpx

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "nextgpt.serve",
            f"bundle={bundle}",
            f"port={port}",
            f"out={out}",
            "model_name=bench",
            "log_level=warning",
            "max_queue=64",
        ],
        cwd=ROOT,
        env=env,
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("the server did not start in 300 s")


def run(client, messages: list, n: int, concurrency: int, max_tokens: int) -> dict:
    def one(_):
        t0 = time.perf_counter()
        client.chat.completions.create(model="bench", messages=messages, max_tokens=max_tokens)
        return time.perf_counter() - t0

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        latencies = sorted(pool.map(one, range(n)))
    wall = time.perf_counter() - start
    return {
        "requests_per_s": n / wall,
        "p50_s": statistics.median(latencies),
        "p95_s": latencies[min(int(0.95 * n), n - 1)],
        "requests": n,
        "concurrency": concurrency,
    }


def main() -> None:
    import openai

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", required=True, type=Path)
    p.add_argument("--image", type=Path, help="an image to ask about (default: the first synthetic image)")
    p.add_argument("--requests", type=int, default=24, help="requests per measurement")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--out", type=Path, default=Path("outputs/serve_bench"))
    args = p.parse_args()
    image = args.image
    if image is None:
        folder = ROOT / ".cache" / "synthetic" / "synthetic_image"
        image = folder / "images" / json.loads((folder / "synthetic_image.json").read_text())[0]["image_name"]
    url = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
    kinds = {
        "text about an image": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": url}},
                    {"type": "text", "text": "Describe this image."},
                ],
            }
        ],
        "image on request": [
            {
                "role": "user",
                "content": "Please make an image of a red circle at the top left on a black background",
            }
        ],
    }
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = start_server(args.bundle, port, args.out)
    try:
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=600
        )
        results = {}
        for kind, messages in kinds.items():
            run(client, messages, 2, 1, args.max_tokens)  # warm-up: decoder pipelines load on first use
            results[kind] = {c: run(client, messages, args.requests, c, args.max_tokens) for c in (1, 8)}
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    print(
        f"server latency and throughput, bundle {args.bundle}, {args.requests} requests each, "
        f"max_tokens {args.max_tokens}, {os.cpu_count()} CPUs"
    )
    print(f"{'request':22s} {'conc':>4s} {'req/s':>7s} {'p50 s':>7s} {'p95 s':>7s}")
    for kind, by_conc in results.items():
        for c, r in by_conc.items():
            print(f"{kind:22s} {c:4d} {r['requests_per_s']:7.2f} {r['p50_s']:7.3f} {r['p95_s']:7.3f}")
        print(
            f"{kind:22s} throughput ratio conc 8 / conc 1: "
            f"{by_conc[8]['requests_per_s'] / by_conc[1]['requests_per_s']:.2f}"
        )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
