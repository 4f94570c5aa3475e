"""Prompt templates and the one function that turns a conversation into model inputs.

A conversation is a list of (human, assistant) turns whose texts carry LLaVA-style placeholders
(``<image>``, ``<audio>``, ``<video>``). In a human turn a placeholder becomes
``<Img>`` + projected media slots + ``</Img>``; in an assistant turn it becomes the modality's
signal-token group. Loss is on assistant tokens only; prompt and media positions are -100.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Sequence

from nextgpt import modality as modality_registry
from nextgpt.tokens import TokenLayout

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Template:
    name: str
    system: str  # text before the first turn
    human: str  # opens a human turn
    assistant: str  # opens the assistant's answer (after the human text)
    answer_end: str  # closes an answer; part of the labelled answer, so the model learns to stop
    turn_sep: str  # between a closed answer and the next human turn
    stop: str  # generation stops when the decoded answer ends with this


TEMPLATES: dict[str, Template] = {
    # Vicuna v0, the legacy NExT-GPT default: "### Human: ...\n### Assistant: ...\n###"
    "vicuna_v0": Template("vicuna_v0", "", "### Human: ", "\n### Assistant: ", "\n###", " ", "###"),
    # Vicuna v1.1 / v1.5: "USER: ... ASSISTANT: ...</s>"
    "vicuna_v1_1": Template(
        "vicuna_v1_1",
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions. ",
        "USER: ", " ASSISTANT: ", "</s>", "", "</s>",
    ),
}


def get_template(name: str) -> Template:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise KeyError(f"unknown prompt template {name!r}; known: {sorted(TEMPLATES)}") from None


@dataclass
class Conversation:
    """One training or inference example in modality-neutral form."""

    key: str
    turns: list[tuple[str, str]]  # (human, assistant); the last assistant text may be "" at inference
    media_in: list[tuple[str, str]] = field(default_factory=list)  # (modality, path) in placeholder order
    captions_out: list[tuple[str, str]] = field(default_factory=list)  # (modality, caption) per output group
    # (modality, path) of the target media of each output group, where known (for the denoising loss)
    media_out: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    media_slots: list[tuple[int, str, int]]  # (start, modality, index into media_in)
    signal_groups: list[tuple[int, str, int]]  # (start, modality, index into captions_out)
    truncated: bool = False


def placeholder_pattern() -> re.Pattern:
    """Matches ``<image>``, ``<audio>``, ``<video>`` (every registered modality's placeholder)."""
    names = "|".join(re.escape(n) for n in modality_registry.names())
    return re.compile(rf"<({names})>")


def encode_conversation(
    conv: Conversation,
    tokenizer,
    layout: TokenLayout,
    template: Template,
    *,
    num_media_tokens: int,
    max_length: int,
    slot_id: int,
) -> Encoded:
    """Tokenise ``conv`` with ``template``; truncate to ``max_length`` without splitting a media
    slot or a signal group (a group cut by truncation is dropped whole)."""
    pattern = placeholder_pattern()
    ids: list[int] = []
    labels: list[int] = []
    slots: list[tuple[int, str, int]] = []
    groups: list[tuple[int, str, int]] = []
    spans: list[tuple[int, int]] = []  # atomic spans that truncation must not split
    media_iter = iter(enumerate(conv.media_in))
    caption_iter = iter(enumerate(conv.captions_out))

    def text(t: str, labelled: bool) -> None:
        if not t:
            return
        toks = tokenizer(t, add_special_tokens=False)["input_ids"]
        ids.extend(toks)
        labels.extend(toks if labelled else [IGNORE_INDEX] * len(toks))

    def media_slot(name: str) -> tuple[list[int], list[int]]:
        open_id, close_id = layout.marker_ids[name]
        return [open_id] + [slot_id] * num_media_tokens + [close_id], [IGNORE_INDEX] * (num_media_tokens + 2)

    def signal_group(name: str) -> tuple[list[int], list[int]]:
        sig = list(layout.signal_ids[name])
        return sig, sig

    def turn(t: str, labelled: bool, items, what: str, expand, records: list, offset: int) -> None:
        """Text with placeholders; each placeholder takes the next of ``items`` and is expanded
        into an atomic span (media slot in a human turn, signal group in an answer)."""
        pos = 0
        for m in pattern.finditer(t):
            text(t[pos : m.start()], labelled)
            name = m.group(1)
            try:
                index, (item_mod, _) = next(items)
            except StopIteration:
                raise ValueError(f"sample {conv.key!r}: placeholder <{name}> has no {what}") from None
            if item_mod != name:
                raise ValueError(f"sample {conv.key!r}: placeholder <{name}> but the {what} is {item_mod!r}")
            start = len(ids)
            span_ids, span_labels = expand(name)
            ids.extend(span_ids)
            labels.extend(span_labels)
            records.append((start + offset, name, index))
            spans.append((start, len(ids)))
            pos = m.end()
        text(t[pos:], labelled)

    if tokenizer.bos_token_id is not None:
        ids.append(tokenizer.bos_token_id)
        labels.append(IGNORE_INDEX)
    text(template.system, False)
    for i, (h, a) in enumerate(conv.turns):
        if i:
            text(template.turn_sep, False)
        text(template.human, False)
        turn(h, False, media_iter, "input media", media_slot, slots, 1)
        text(template.assistant, False)
        if a:
            turn(a, True, caption_iter, "output caption", signal_group, groups, 0)
            text(template.answer_end, True)

    truncated = len(ids) > max_length
    if truncated:
        cut = max_length
        for s, e in spans:
            if s < cut < e:
                cut = s
        ids, labels = ids[:cut], labels[:cut]
        slots = [s for s in slots if s[0] < cut]
        groups = [g for g in groups if g[0] < cut]
    return Encoded(ids, labels, slots, groups, truncated)


def prompt_for_generation(turns: Sequence[tuple[str, str]], next_human: str) -> list[tuple[str, str]]:
    """History plus a new human turn with an empty answer: what the model continues from."""
    return [*turns, (next_human, "")]
