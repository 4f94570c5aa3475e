"""Checks of a dataset config against the files it names, before anything loads."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from datamodules.nextgpt_layout import json_files
from datamodules.shard_versions import source_shards
from nextgpt.data_source import DataSource


@dataclass(frozen=True)
class DatasetFiles:
    """What :func:`data_path_errors` checks of a dataset config read without a data module (the
    cache CLI): the dataset's ``name`` and ``sources``, how it is read (``loader``: json or shards;
    ``synthetic``: generated, nothing to check), where shards go (``paths.shards``) and
    ``dataset.source_changed``. A data module checks its own sources (``path_errors()``)."""

    name: str
    sources: tuple[DataSource, ...]
    shards_root: str
    loader: str = "json"
    synthetic: bool = False
    source_changed: str = "rewrite"


def data_path_errors(dataset: DatasetFiles, objective: str) -> list[str]:
    """What ``dataset``'s sources lack for ``objective``, read as its loader reads them (none for
    generated data): the check of a config that has no data module (the cache CLI)."""
    if dataset.synthetic:
        return []
    if dataset.loader == "shards":
        return shard_path_errors(
            dataset.name, dataset.sources, objective, dataset.shards_root, dataset.source_changed
        )
    return json_path_errors(dataset.name, dataset.sources, objective)


def shard_path_errors(
    name: str, sources: Sequence[DataSource], objective: str, shards_root: str, source_changed: str
) -> list[str]:
    """Sharded sources with neither shards nor the layout they are written from (``name``:
    ``dataset.name``; ``shards_root``: ``paths.shards``; ``source_changed``: keep also reads the
    shards of a data root that is gone)."""
    errors = []
    keep = source_changed == "keep"
    for i, src in enumerate(sources):
        has_json = bool(src.root) and (Path(src.data_root) / f"{src.name}.json").is_file()
        if src.urls:
            if not source_shards(src, objective, shards_root):
                errors.append(f"dataset.sources[{i}].urls={src.urls!r}: no .tar shards there")
        elif src.shards:
            if not source_shards(src, objective, shards_root) and not has_json:
                errors.append(
                    f"dataset.sources[{i}].shards={src.shards!r}: no shards there and no "
                    f"{src.root}/{src.name}.json to write them from"
                )
        elif not has_json and not (
            keep and src.root and source_shards(src, objective, shards_root, "keep", "none")
        ):
            what = f"{Path(src.root) / (src.name + '.json')} does not exist" if src.root else "no data root"
            errors.append(
                f"dataset.sources[{i}].root={src.root!r}: {what} (dataset {name!r}; set "
                "paths.data_root=DIR; shards are only read for the data root they were written from: "
                "dataset.sources[i].shards=DIR names a folder of shards alone)"
            )
    return errors


def json_path_errors(name: str, sources: Sequence[DataSource], objective: str) -> list[str]:
    """Missing JSON files of sources read straight from the NExT-GPT layout (or one of the
    original's stage-3 files) for ``objective``."""
    errors = []
    for i, src in enumerate(sources):
        if src.format != "nextgpt":  # one of the original's stage-3 files
            if not Path(str(src.file)).is_file():
                errors.append(f"dataset.sources[{i}].file={src.file!r}: no such file (format {src.format})")
            continue
        errors += [
            f"dataset.sources[{i}].root={src.root!r}: {path} does not exist (dataset {name!r}; set "
            "paths.data_root=DIR)"
            for path in json_files(src.name, src.data_root, objective)
            if not path.is_file()
        ]
    return errors
