"""Shard samples -> conversations: ``prepare`` records (``pair`` / ``conversation``) and plain
img2dataset / video2dataset pairs, checked member by member; a bad one raises :class:`SkipSample`."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any, cast

import numpy as np

from datamodules.entries import Skip
from datamodules.nextgpt_layout import OBJECTIVES, _pairs_caption, _pairs_generate
from datamodules.records import Entry, ShardRecord
from datamodules.shards.files import Members, TarSamples
from datamodules.shards.sample import ShardSample, SkipSample
from nextgpt import modality as modality_registry
from nextgpt.modality import Modality
from nextgpt.prompts import Conversation

PAIR_OBJECTIVES = ("caption", "generate")
_HAS_MEDIA_OUT = "media_out" in {f.name for f in fields(Conversation)}

FeatureLookup = Callable[[Path, str], np.ndarray | None]  # (shard path, member) -> a cached feature, or None


def _conversation(
    key: str,
    turns: list[tuple[str, str]],
    media_in: list[tuple[str, str]],
    captions_out: list[tuple[str, str]],
    media_out: list[tuple[str, str]],
    kind: str = "",
) -> Conversation:
    """A Conversation with output media members where the dataclass has that field."""
    extra = {"media_out": media_out} if _HAS_MEDIA_OUT and media_out else {}
    return Conversation(key, turns, media_in=media_in, captions_out=captions_out, kind=kind, **extra)


def _pairs_of_str(value: Any, what: str) -> list[tuple[str, str]]:
    if not isinstance(value, list) or not all(
        isinstance(v, list) and len(v) == 2 and all(isinstance(x, str) for x in v) for v in value
    ):
        raise SkipSample("wrong JSON type", f"{what} is not a list of [str, str]")
    return [(a, b) for a, b in value]


def _modality(name: str) -> Modality:
    try:
        return modality_registry.get(name)
    except KeyError:
        raise SkipSample("unknown modality", name) from None


def _placeholder_counts(texts: Iterable[str]) -> Counter[str]:
    counts: Counter[str] = Counter()
    for t in texts:
        for name in modality_registry.names():
            counts[name] += t.count(modality_registry.get(name).placeholder)
    return +counts


class RecordReader:
    """Makes one shard sample a :class:`ShardSample` for the stream's objective.

    ``modality``: of plain (img2dataset) pairs, ``path_modality`` per shard overriding it.
    ``pair_objective``: what pairs become (default: the objective itself for caption/generate; an
    instruct stream meeting a pair without it is a configuration error). ``output_media``: also
    read the target media of output groups. ``feature_lookup``: cached input features; a member
    it has is not read."""

    def __init__(
        self,
        objective: str = "caption",
        modality: str | None = None,
        pair_objective: str | None = None,
        output_media: bool = False,
        path_modality: Mapping[str | Path, str] | Mapping[Path, str] | None = None,
        feature_lookup: FeatureLookup | None = None,
    ):
        if objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {objective!r}; known: {list(OBJECTIVES)}")
        if pair_objective is not None and pair_objective not in PAIR_OBJECTIVES:
            raise ValueError(f"pair_objective must be one of {PAIR_OBJECTIVES}, got {pair_objective!r}")
        if modality is not None:
            modality_registry.get(modality)
        self.objective, self.modality = objective, modality
        self.pair_objective = pair_objective or (objective if objective in PAIR_OBJECTIVES else None)
        self.output_media = bool(output_media)
        self.feature_lookup = feature_lookup
        self.path_modality = {Path(k): v for k, v in (path_modality or {}).items()}
        for name in self.path_modality.values():
            modality_registry.get(name)

    def parse(self, reader: TarSamples, key: str, members: Members) -> ShardSample:
        shard = reader.path.name
        obj: Any = None
        if "json" in members:
            try:
                obj = json.loads(reader.read(members["json"]))
            except (ValueError, UnicodeDecodeError) as e:
                raise SkipSample("unreadable JSON", str(e)) from None
            if isinstance(obj, dict) and "kind" in obj:
                return self._record(reader, key, members, cast(ShardRecord, obj))
            if not isinstance(obj, dict):
                raise SkipSample("wrong JSON type", f"the .json member holds a {type(obj).__name__}")
        # a plain pair, as img2dataset / video2dataset write them: caption in .txt (or the json's "caption")
        if "txt" in members:
            try:
                caption: Any = reader.read(members["txt"]).decode("utf-8")
            except UnicodeDecodeError as e:
                raise SkipSample("unreadable caption", str(e)) from None
        else:
            caption = obj.get("caption") if obj is not None else None
        modality = self.path_modality.get(reader.path, self.modality)
        if modality is None:
            raise ValueError(
                f"{shard}:{key} is a plain text-X pair (no prepare record): give the stream modality="
            )
        mod = modality_registry.get(modality)
        media = [ext for ext in members if "." + ext.rsplit(".", 1)[-1] in mod.extensions]
        return self._pair(reader, key, members, caption, mod.name, media[0] if media else None, None, key)

    def _record(self, reader: TarSamples, key: str, members: Members, obj: ShardRecord) -> ShardSample:
        kind, source = obj["kind"], obj.get("source") if isinstance(obj.get("source"), str) else None
        conv_key = obj["key"] if isinstance(obj.get("key"), str) and obj["key"] else key
        if kind == "pair":
            media = obj.get("media")
            if not (isinstance(media, list) and len(media) == 2 and all(isinstance(x, str) for x in media)):
                raise SkipSample("wrong JSON type", "media is not [modality, member extension]")
            return self._pair(
                reader,
                key,
                members,
                obj.get("caption"),
                _modality(media[0]).name,
                media[1].lower(),
                source,
                conv_key,
            )
        if kind != "conversation":
            raise SkipSample("unknown record kind", repr(kind))
        turns = _pairs_of_str(obj.get("turns"), "turns")
        media_in = _pairs_of_str(obj.get("media_in", []), "media_in")
        captions_out = _pairs_of_str(obj.get("captions_out", []), "captions_out")
        if not turns:
            raise SkipSample("wrong JSON type", "turns is empty")
        for name, caption in captions_out:
            _modality(name)
            if not caption.strip():
                raise SkipSample("empty caption", f"{name} output caption")
        want_in = _placeholder_counts(h for h, _ in turns)
        want_out = _placeholder_counts(a for _, a in turns)
        if want_in != Counter(_modality(m).name for m, _ in media_in) or want_out != Counter(
            m for m, _ in captions_out
        ):
            raise SkipSample("placeholder mismatch", f"placeholders in {dict(want_in)} out {dict(want_out)}")
        media_out = _pairs_of_str(obj.get("media_out", []), "media_out") if self.output_media else []
        data: dict[str, bytes] = {}
        features: dict[str, np.ndarray] = {}
        for (_, ext), is_input in [*((m, True) for m in media_in), *((m, False) for m in media_out)]:
            if ext.lower() not in members:
                raise SkipSample("missing media member", f"{key}.{ext}")
            member = f"{key}.{ext.lower()}"
            cached = self._cached(reader, member) if is_input else None
            if cached is not None:
                features[member] = cached
            else:
                data[member] = reader.read(members[ext.lower()])
        conv = _conversation(
            conv_key,
            turns,
            [(m, f"{key}.{e.lower()}") for m, e in media_in],
            captions_out,
            [(m, f"{key}.{e.lower()}") for m, e in media_out],
        )
        return ShardSample(conv, data, reader.path.name, key, source, features=features)

    def _pair(
        self,
        reader: TarSamples,
        key: str,
        members: Members,
        caption: Any,
        modality: str,
        ext: str | None,
        source: str | None,
        conv_key: str,
    ) -> ShardSample:
        if caption is None:
            raise SkipSample("missing caption")
        if not isinstance(caption, str):
            raise SkipSample("wrong JSON type", f"caption is a {type(caption).__name__}")
        if not caption.strip():
            raise SkipSample("empty caption")
        if self.pair_objective is None:
            raise ValueError(
                f"{reader.path.name}:{key} is a text-X pair in an {self.objective!r} stream:"
                f" set pair_objective to one of {PAIR_OBJECTIVES} or leave pair shards out"
            )
        mod = modality_registry.get(modality)
        member = f"{key}.{ext}" if ext else f"{key}.?"
        entry = cast(Entry, {"id": conv_key, mod.name_field: member, "caption": caption})
        generate = self.pair_objective == "generate"
        try:
            # root None: the name is a tar member, not a file under a data root
            conv = (_pairs_generate if generate else _pairs_caption)(entry, mod, None, 0)
        except Skip as e:
            raise SkipSample(str(e)) from None
        if generate and not self.output_media:  # text -> X: the media is not needed
            return ShardSample(
                _conversation(conv.key, conv.turns, [], conv.captions_out, [], conv.kind),
                {},
                reader.path.name,
                key,
                source,
            )
        if ext is None or ext not in members:
            raise SkipSample("missing media member", f"no {modality} member" if ext is None else member)
        media = [(modality, member)]
        conv = _conversation(
            conv.key,
            conv.turns,
            [] if generate else media,
            conv.captions_out,
            media if generate else [],
            conv.kind,
        )
        cached = None if generate else self._cached(reader, member)
        if cached is not None:  # its feature is cached: the member is never read
            return ShardSample(conv, {}, reader.path.name, key, source, features={member: cached})
        return ShardSample(conv, {member: reader.read(members[ext])}, reader.path.name, key, source)

    def _cached(self, reader: TarSamples, member: str) -> np.ndarray | None:
        return self.feature_lookup(reader.path, member) if self.feature_lookup is not None else None
