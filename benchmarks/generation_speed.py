"""Decoding speed with and without the KV cache on the tiny LLM, and where the time of a
text-to-X request goes (the LLM against each decoder). Needs a stage-3 bundle: `make demo`.

    .venv/bin/python benchmarks/generation_speed.py [--bundle bundles/stage3] [--tokens 128]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from nextgpt.generate import Generator

REQUESTS = {
    "image": "Please make an image of a red circle at the top left on a black background",
    "audio": "Please make an audio of a loud high pitched beeping tone",
    "video": "Please make a video of a green square moving to the right",
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", default="bundles/stage3")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if not (Path(args.bundle) / "trainable.safetensors").is_file():
        sys.exit(f"{args.bundle}: no stage bundle; run `make demo` first (it writes bundles/stage3)")
    torch.manual_seed(0)
    gen = Generator(args.bundle)
    print(f"bundle {args.bundle}, torch threads {torch.get_num_threads()}")
    rates = {}
    for use_cache in (True, False):
        best = 0.0
        for _ in range(args.repeats):
            res = gen.chat(
                "Tell me about shapes.",
                max_new_tokens=args.tokens,
                ignore_eos=True,
                decode=False,
                use_cache=use_cache,
            )
            best = max(best, res.new_tokens / res.timing["llm"])
        rates[use_cache] = best
        print(
            f"KV cache {'on ' if use_cache else 'off'}: {best:8.1f} tokens/s ({args.tokens} new "
            f"tokens, best of {args.repeats})"
        )
    print(f"speed-up from the KV cache: x{rates[True] / rates[False]:.2f}")
    with tempfile.TemporaryDirectory() as out:
        for name, prompt in REQUESTS.items():
            gen.chat(prompt, out_dir=out)  # load the pipeline once, outside the timing
            res = gen.chat(prompt, out_dir=out)
            split = ", ".join(f"{k} {v:.3f} s" for k, v in res.timing.items())
            print(f"{name:5}: groups {res.signal_groups}, total {res.seconds:.3f} s: {split}")


if __name__ == "__main__":
    main()
