"""The command-line entry points: the one place inside ``nextgpt/`` that wires the data side
(``datamodules/``) and the callbacks (``callbacks/``) to the library. ``train.py`` and
``evaluate.py`` at the top level call :mod:`nextgpt.cli.train` and :mod:`nextgpt.cli.evaluate`.
"""

from __future__ import annotations

from typing import cast

from omegaconf import DictConfig, OmegaConf

from datamodules.sources import DatasetFiles
from nextgpt.data_source import SourceEntry, data_sources


def dataset_files(cfg: DictConfig) -> DatasetFiles:
    """What :func:`datamodules.sources.data_path_errors` checks of ``cfg.dataset`` (and ``paths.shards``)."""
    return DatasetFiles(
        name=str(cfg.dataset.name),
        sources=tuple(
            data_sources(cast(list[SourceEntry], OmegaConf.to_container(cfg.dataset.sources, resolve=True)))
        ),
        shards_root=str(cfg.paths.shards),
        loader=str(cfg.dataset.get("loader", "json")),
        synthetic=bool(cfg.dataset.get("synthetic")),
        source_changed=str(cfg.dataset.get("source_changed", "rewrite")),
    )
