"""Checks of a dataset config against the files it names, before anything loads."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from datamodules.nextgpt_layout import json_files
from datamodules.shard_versions import source_shards


def data_path_errors(cfg: DictConfig, objective: str) -> list[str]:
    """Missing JSON files of the dataset's sources for ``objective`` (none for generated data); for
    sharded sources, neither shards nor the layout they are written from."""
    if cfg.dataset.get("synthetic"):
        return []
    if cfg.dataset.get("loader", "json") == "shards":
        errors = []
        keep = cfg.dataset.get("source_changed", "rewrite") == "keep"
        for i, src in enumerate(cfg.dataset.sources):
            has_json = bool(src.get("root")) and (Path(src.root) / f"{src.name}.json").is_file()
            if src.get("urls"):
                if not source_shards(src, objective, cfg.paths.shards):
                    errors.append(f"dataset.sources[{i}].urls={src.urls!r}: no .tar shards there")
            elif src.get("shards"):
                if not source_shards(src, objective, cfg.paths.shards) and not has_json:
                    errors.append(
                        f"dataset.sources[{i}].shards={src.shards!r}: no shards there and no "
                        f"{src.get('root')}/{src.name}.json to write them from"
                    )
            elif not has_json and not (
                keep and src.get("root") and source_shards(src, objective, cfg.paths.shards, "keep", "none")
            ):
                what = (
                    f"{Path(src.root) / (src.name + '.json')} does not exist"
                    if src.get("root")
                    else "no data root"
                )
                errors.append(
                    f"dataset.sources[{i}].root={src.get('root')!r}: {what} (dataset {cfg.dataset.name!r}; set "
                    "paths.data_root=DIR; shards are only read for the data root they were written from: "
                    "dataset.sources[i].shards=DIR names a folder of shards alone)"
                )
        return errors
    errors = []
    for i, src in enumerate(cfg.dataset.sources):
        if src.get("format", "nextgpt") != "nextgpt":  # one of the original's stage-3 files
            if not Path(str(src.file)).is_file():
                errors.append(f"dataset.sources[{i}].file={src.file!r}: no such file (format {src.format})")
            continue
        errors += [
            f"dataset.sources[{i}].root={src.root!r}: {path} does not exist (dataset {cfg.dataset.name!r}; set "
            "paths.data_root=DIR)"
            for path in json_files(src.name, src.root, objective)
            if not path.is_file()
        ]
    return errors
