"""Checks of a dataset config against the files it names, before anything loads."""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from datamodules.nextgpt_layout import json_files
from datamodules.shard_datamodule import source_shards


def data_path_errors(cfg: DictConfig, objective: str) -> list[str]:
    """Missing JSON files of the dataset's sources for ``objective`` (none for generated data); for
    sharded sources, neither shards nor the layout they are written from."""
    if cfg.dataset.get("synthetic"):
        return []
    if cfg.dataset.get("loader", "json") == "shards":
        errors = []
        for i, src in enumerate(cfg.dataset.sources):
            if src.get("urls"):
                if not source_shards(src, objective, cfg.paths.shards):
                    errors.append(f"dataset.sources[{i}].urls={src.urls!r}: no .tar shards there")
            elif not source_shards(src, objective, cfg.paths.shards) and not (Path(src.root) / f"{src.name}.json").is_file():
                errors.append(f"dataset.sources[{i}].root={src.root!r}: no shards in "
                              f"{Path(cfg.paths.shards) / src.name} and no {Path(src.root) / (src.name + '.json')} "
                              f"to write them from (dataset {cfg.dataset.name!r}; set paths.data_root=DIR)")
        return errors
    return [
        f"dataset.sources[{i}].root={src.root!r}: {path} does not exist (dataset {cfg.dataset.name!r}; set paths.data_root=DIR)"
        for i, src in enumerate(cfg.dataset.sources)
        for path in json_files(src.name, src.root, objective)
        if not path.is_file()
    ]
