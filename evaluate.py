"""Evaluate a stage bundle, or score given outputs.

python evaluate.py checkpoint=bundles/stage3 dataset=synthetic              # held-out losses
python evaluate.py task=t2i_coco checkpoint=bundles/stage3 limit=1000       # a benchmark task
python evaluate.py task=i2t_coco predictions=captions.json                  # another system's outputs
"""

from __future__ import annotations

import re
import sys

import hydra
from omegaconf import DictConfig

from nextgpt.config import CONFIG_DIR, main_guard, register_resolvers

register_resolvers()
_TASK_ARG = re.compile(r"^\+{0,2}task=(?P<name>[^,\s]*)$")


def check_task_args(argv: list[str]) -> None:
    """An unknown ``task=`` exits 2 with the list of tasks (Hydra alone would exit 1 with a stack of text)."""
    known = sorted(p.stem for p in (CONFIG_DIR / "task").glob("*.yaml"))
    for arg in argv:
        m = _TASK_ARG.match(arg)
        if m and m["name"] not in known:
            print(
                f"error: invalid config:\n  task={m['name']!r}: unknown evaluation task; available: {known}",
                file=sys.stderr,
            )
            sys.exit(2)


@hydra.main(config_path=str(CONFIG_DIR), config_name="evaluate", version_base="1.3")
@main_guard
def _main(cfg: DictConfig) -> float | None:
    from nextgpt.cli.evaluate import evaluate

    return evaluate(cfg).get("loss")


def main() -> None:
    check_task_args(sys.argv[1:])
    _main()


if __name__ == "__main__":
    main()
