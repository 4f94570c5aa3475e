"""Train one NExT-GPT stage: `python train.py stage=2 dataset=webvid`, `python train.py -m stage=1,2,3`."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from nextgpt.config import CONFIG_DIR, main_guard, normalize_overrides, register_resolvers

register_resolvers()


@hydra.main(config_path=str(CONFIG_DIR), config_name="train", version_base="1.3")
@main_guard
def _main(cfg: DictConfig) -> float | None:
    from nextgpt.cli.train import train

    metrics = train(cfg)
    return metrics.get("train/loss")


def main() -> None:
    sys.argv = [sys.argv[0], *normalize_overrides(sys.argv[1:])]
    _main()


if __name__ == "__main__":
    main()
