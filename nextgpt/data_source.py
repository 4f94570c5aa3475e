"""One data source of a dataset config (a ``dataset.sources`` entry), as the data side reads it.

``nextgpt.schema`` checks the entries (names, weights, formats, modalities); :meth:`DataSource.of`
turns a checked entry (a plain mapping, as Hydra hands it to a datamodule) into this record once,
so the readers, the shard writer and the caches read named fields rather than dictionary keys.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from os import PathLike
from typing import TypedDict


class SourceEntry(TypedDict, total=False):
    """A ``dataset.sources`` entry as plain data (``OmegaConf.to_container``, or as Hydra hands it
    to a datamodule); keys as in ``configs/dataset/*.yaml``, checked by ``nextgpt.schema``."""

    name: str
    modality: str
    root: str | None
    weight: int
    format: str | None  # nextgpt (the folder layout, the default) or one of the original's stage-3 formats
    file: str | None  # the JSON file of a source in one of the original's formats
    urls: str | list[str] | None  # shards as they are: a folder, brace pattern, glob, or a list of these
    shards: str | None  # a folder of shards the config names


@dataclass(frozen=True)
class DataSource:
    """A ``dataset.sources`` entry: its ``name`` and ``modality``; its data ``root`` (``None``: shards
    alone), the ``weight`` of its samples in the mix, its ``format`` (``nextgpt`` or one of the
    original's stage-3 formats, which name their ``file``), and where its shards are: ``urls``
    (shards as they are) or ``shards`` (a folder named by the config)."""

    name: str
    modality: str
    root: str | None = None
    weight: int = 1
    format: str = "nextgpt"
    file: str | None = None
    urls: str | tuple[str, ...] | None = None
    shards: str | None = None

    @classmethod
    def of(cls, entry: SourceEntry | DataSource) -> DataSource:
        """The source of one config entry (or a :class:`DataSource` already)."""
        if isinstance(entry, DataSource):
            return entry
        urls = entry.get("urls")
        return cls(
            name=str(entry["name"]),
            modality=str(entry["modality"]),
            root=_path_or_none(entry.get("root")),
            weight=int(entry.get("weight", 1)),
            format=str(entry.get("format") or "nextgpt"),
            file=_path_or_none(entry.get("file")),
            urls=None
            if urls is None
            else (_path_or_none(urls) if isinstance(urls, str | PathLike) else tuple(map(str, urls))),
            shards=_path_or_none(entry.get("shards")),
        )

    @property
    def data_root(self) -> str:
        """``root``, where the caller needs one (the NExT-GPT layout, a source's media)."""
        if self.root is None:
            raise ValueError(f"dataset source {self.name!r} names no data root")
        return self.root


class PairSettings(TypedDict, total=False):
    """``dataset.pairs``: what text-X pairs say in training (:class:`nextgpt.prompts.PairStyle`)."""

    style: str  # ours | legacy
    caption_prompt: str
    clean_captions: bool


class SyntheticSettings(TypedDict):
    """``dataset.synthetic``: the generated data set a run writes first (its folder, size and seed)."""

    root: str
    num_per_modality: int
    seed: int


def _path_or_none(value: object) -> str | None:
    return None if value is None else str(value)


def data_sources(entries: Iterable[SourceEntry | DataSource]) -> list[DataSource]:
    """The sources of a ``dataset.sources`` list."""
    return [DataSource.of(e) for e in entries]


# --- what a source is, recorded with a run (datamodules/source_files.py computes it) ----------------
class MediaListing(TypedDict):
    """The files under a source's media folder: count, total size and a digest of their listing."""

    files: int
    bytes: int
    digest: str


class SourceIdentity(TypedDict, total=False):
    """What a data source is (:mod:`datamodules.source_files`): its resolved ``root``, the signatures of
    its ``json`` files (file name -> signature) and, unless left out, its ``media`` listing. An index
    written before identities records the JSON signatures alone (file name -> signature)."""

    root: str
    json: dict[str, str]
    media: MediaListing
