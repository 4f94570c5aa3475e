"""The world scorecard: the ``world_*`` evaluation results of one bundle in one table.

Reads every ``results.json`` under the given folders (a ``python evaluate.py -m task=world_i2t,...``
sweep writes one per task) and prints, per task, each attribute's accuracy beside chance and, for
generation, beside the decoder alone given the true caption (the ceiling); writes the same as
``scorecard.json`` / ``scorecard.md`` when ``--out`` is given.

    python -m nextgpt.world.scorecard multirun/evaluate/... [--out outputs/demo]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ORDER = ["world_i2t", "world_a2t", "world_v2t", "world_t2i", "world_t2a", "world_t2v"]


def collect(folders: list[Path]) -> dict[str, dict]:
    """task name -> its ``world_attributes`` metric, from the ``results.json`` files under ``folders``."""
    found: dict[str, dict] = {}
    for folder in folders:
        for path in sorted(Path(folder).rglob("results.json")):
            result = json.loads(path.read_text())
            metric = (result.get("metrics") or {}).get("world_attributes")
            task = result.get("task") or path.parent.name
            if isinstance(task, dict):
                task = task.get("name")
            if metric is not None and str(task).startswith("world_"):
                found[str(task)] = metric
    return dict(sorted(found.items(), key=lambda kv: ORDER.index(kv[0]) if kv[0] in ORDER else len(ORDER)))


def _cell(v) -> str:
    return f"{v:.2f}" if isinstance(v, (int, float)) else "-"


def markdown(scores: dict[str, dict]) -> str:
    lines = ["| task | attribute | accuracy | chance | decoder alone (ceiling) |", "|---|---|---|---|---|"]
    for task, metric in scores.items():
        ceiling = metric.get("ceiling")
        if not isinstance(ceiling, dict):
            ceiling = {}
        for attr, acc in (metric.get("by_attribute") or {}).items():
            lines.append(
                f"| {task} | {attr} | {_cell(acc)} | {_cell(metric.get('chance', {}).get(attr))} | "
                f"{_cell(ceiling.get(attr))} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m nextgpt.world.scorecard", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("folders", nargs="+", type=Path, help="evaluation run folders (searched for results.json)")
    p.add_argument("--out", type=Path, help="write scorecard.json and scorecard.md here")
    args = p.parse_args(argv)
    scores = collect(args.folders)
    if not scores:
        print(f"error: no world_* results.json under {', '.join(map(str, args.folders))}", file=sys.stderr)
        return 2
    table = markdown(scores)
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "scorecard.json").write_text(json.dumps(scores, indent=2))
        (args.out / "scorecard.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
