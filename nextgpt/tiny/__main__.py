"""``python -m nextgpt.tiny --out DIR [--force]``: build the tiny backbones; prints each path and its size."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from nextgpt.tiny import TINY_BUILD_VERSION, build_all, is_complete


def _du(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    """CLI: ``python -m nextgpt.tiny --out DIR [--force]``; prints each built path and its size."""
    parser = argparse.ArgumentParser(description="Build random tiny NExT-GPT backbones for offline tests.")
    parser.add_argument("--out", required=True, type=Path, help="cache folder to build into")
    parser.add_argument("--force", action="store_true", help="rebuild even if a complete build exists")
    args = parser.parse_args(argv)
    cached = not args.force and is_complete(args.out)
    t0 = time.perf_counter()
    paths = build_all(args.out, force=args.force)
    dt = time.perf_counter() - t0
    print(f"tiny backbones v{TINY_BUILD_VERSION} {'(cached)' if cached else f'built in {dt:.1f}s'}")
    for name, path in paths.items():
        print(f"  {name:9s} {path}  {_du(path) / 1e6:.2f} MB")
    print(f"  total     {_du(Path(args.out)) / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
