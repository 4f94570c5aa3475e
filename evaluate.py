"""Evaluate a stage bundle: `python evaluate.py checkpoint=bundles/stage3 dataset=synthetic`."""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

from nextgpt.config import main_guard, register_resolvers

register_resolvers()


@hydra.main(config_path="configs", config_name="evaluate", version_base="1.3")
@main_guard
def _main(cfg: DictConfig) -> float | None:
    from nextgpt.evaluation import evaluate

    return evaluate(cfg).get("loss")


def main() -> None:
    _main()


if __name__ == "__main__":
    main()
