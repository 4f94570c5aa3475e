"""The attributes of the world, per modality, and what a caption says of them.

A caption of the world grammar names each attribute with fixed words (``a red circle at the top
left on a black background``, ``a loud high pitched beeping tone``, ``a green square moving to the
right``). ``caption_attributes`` reads them back from any text, the model's answers included: the
first colour word, the first shape word, the first position phrase, and so on; an attribute the
text does not name is ``None`` (scored as wrong). An image caption of two shapes is read for its
first shape, which is also the one a reference caption names first.
"""

from __future__ import annotations

import re

from nextgpt.world.synthetic import COLOURS, DIRECTIONS, LOUDNESS, PATTERNS, PITCHES, POSITIONS, SHAPES

# modality -> attribute -> its values, in a fixed order
ATTRIBUTES: dict[str, dict[str, tuple[str, ...]]] = {
    "image": {"colour": tuple(COLOURS), "shape": tuple(SHAPES), "position": tuple(POSITIONS)},
    "audio": {"pitch": tuple(PITCHES), "loudness": tuple(LOUDNESS), "pattern": tuple(PATTERNS)},
    "video": {"colour": tuple(COLOURS), "direction": tuple(DIRECTIONS)},
}

# attribute -> value -> the words a caption names it with
_PHRASES: dict[str, dict[str, str]] = {
    "colour": {c: rf"\b{c}\b" for c in COLOURS},
    "shape": {s: rf"\b{s}s?\b" for s in SHAPES},
    "position": {p: rf"\b{phrase}\b" for p, (phrase, _) in POSITIONS.items()},
    "pitch": {p: rf"\b{p}(?:[- ]pitched)?\b" for p in PITCHES},
    "loudness": {v: rf"\b{v}\b" for v in LOUDNESS},
    "pattern": {v: rf"\b{v}\b" for v in PATTERNS},
    "direction": {d: rf"\bmoving {phrase}\b" for d, phrase in DIRECTIONS.items()},
}
_PATTERNS = {
    attr: [(value, re.compile(p, re.IGNORECASE)) for value, p in table.items()]
    for attr, table in _PHRASES.items()
}


def caption_attributes(text: str, modality: str) -> dict[str, str | None]:
    """attribute -> the value ``text`` names first (``None`` where it names none)."""
    out: dict[str, str | None] = {}
    for attr in ATTRIBUTES[modality]:
        found = [
            (m.start(), value) for value, pattern in _PATTERNS[attr] if (m := pattern.search(text or ""))
        ]
        out[attr] = min(found)[1] if found else None
    return out


def chance(modality: str) -> dict[str, float]:
    """attribute -> the accuracy of guessing uniformly (the world draws each value uniformly)."""
    return {attr: 1.0 / len(values) for attr, values in ATTRIBUTES[modality].items()}
