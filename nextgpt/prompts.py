"""Prompt templates and the one function that turns a conversation into model inputs.

A conversation is a list of (human, assistant) turns whose texts carry LLaVA-style placeholders
(``<image>``, ``<audio>``, ``<video>``). In a human turn a placeholder becomes
``<Img>`` + projected media slots + ``</Img>``; in an assistant turn it becomes the modality's
signal-token group. Loss is on assistant tokens only; prompt and media positions are -100.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from nextgpt import modality as modality_registry
from nextgpt.chat_template import chat_chunks
from nextgpt.tokens import TokenLayout

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Template:
    name: str
    system: str  # text before the first turn
    human: str  # opens the first human turn
    assistant: str  # opens the assistant's answer (after the human text)
    answer_end: str  # closes an answer; part of the labelled answer, so the model learns to stop
    turn_sep: str  # between a closed answer and the next human turn
    stop: str  # generation stops when the decoded answer ends with this
    human_next: str | None = None  # opens every later human turn (None: ``human``)
    # the original NExT-GPT's own pieces (``encode_legacy``): markers and signal tokens written as
    # text, each piece tokenised whole, whitespace beside a new token stripped as its tokenizer did
    legacy: bool = False
    # the tokenizer's own chat template (``tokenizer.apply_chat_template``; ``encode_chat``)
    chat: bool = False

    def opener(self, turn: int) -> str:
        return self.human if turn == 0 or self.human_next is None else self.human_next


TEMPLATES: dict[str, Template] = {
    # Vicuna v0, the legacy NExT-GPT default: "### Human: ...\n### Assistant: ...\n### Human: ..."
    # (the answer's closing "\n###" also opens the next turn, as in the original: "Human: " follows)
    "vicuna_v0": Template(
        "vicuna_v0", "", "### Human: ", "\n### Assistant: ", "\n###", "", "###", human_next="Human: "
    ),
    # The original's exact pieces and tokenisation (``experiment=nextgpt_legacy``): what the released
    # weights were trained on. Stage 1 ``### Human: <Img>`` | media | ``</Img> generate a caption\n###
    # Assistant: `` | ``{caption}\n###``; an answer's signal group is ``[IMG0] [IMG1] ...`` after its text.
    "vicuna_v0_legacy": Template(
        "vicuna_v0_legacy",
        "",
        "### Human: ",
        "\n### Assistant: ",
        "\n###",
        "",
        "###",
        human_next="Human: ",
        legacy=True,
    ),
    # The LLM's own chat template (an instruct model's format): every rendered turn as the tokenizer
    # writes it, the loss on the assistant's part of each turn (its end-of-turn token included).
    # ``resolve_template`` fills in the stop string from the template itself.
    "chat": Template("chat", "", "", "", "", "", "", chat=True),
    # Vicuna v1.1 / v1.5: "USER: ... ASSISTANT: ...</s>"
    "vicuna_v1_1": Template(
        "vicuna_v1_1",
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions. ",
        "USER: ",
        " ASSISTANT: ",
        "</s>",
        "",
        "</s>",
    ),
}


def resolve_template(name: str, tokenizer=None) -> Template:
    """``get_template``, with a chat template's stop string read from the template itself: what it
    writes after an assistant message's text (its end-of-turn token)."""
    template = get_template(name)
    if not template.chat or tokenizer is None:
        return template
    probe = "NEXTGPT_PROBE"
    chunk = chat_chunks([("hi", probe)], tokenizer)[-1][0]
    stop = chunk.split(probe, 1)[1].strip() or (tokenizer.eos_token or "")
    return dataclasses.replace(template, stop=stop)


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
    # what made it: "caption" / "generate" (a text-X pair read for that objective), "" (an instruction)
    kind: str = ""


# --- how a text-X pair becomes a conversation ---------------------------------------------------
PAIR_STYLES = ("ours", "legacy")
_CAPTION_CHARS = re.compile(r'["()*#:;~]')


def clean_caption(text: str) -> str:
    """The original's ``process_caption``: lower-cased, each of ``"()*#:;~`` made a space, runs of
    whitespace one space, stripped."""
    return re.sub(r"\s{2,}", " ", _CAPTION_CHARS.sub(" ", text.lower())).rstrip("\n").strip(" ")


@dataclass(frozen=True)
class PairStyle:
    """What a text-X pair says in training (``dataset.pairs``).

    ``ours``: the readers' varied instructions ("Describe this image briefly.", "Generate an image:
    {caption}"), a stage-2 answer that is the signal group alone. ``legacy``: the original's
    stage 1 ``<X> {caption_prompt}`` -> ``{caption}``, and stage 2 ``{caption}`` -> ``{caption}`` +
    signal group (cross-entropy on the echoed caption too). ``clean_captions``: the original's
    :func:`clean_caption` on the captions the LLM reads and writes; the alignment target stays the
    raw caption, as the original's (``process_embeddings.py`` encodes the caption as the data gives
    it, and CLAP's tokenizer is case-sensitive).
    """

    style: str = "ours"
    caption_prompt: str = "generate a caption"
    clean_captions: bool = False

    def __post_init__(self) -> None:
        if self.style not in PAIR_STYLES:
            raise ValueError(f"dataset.pairs.style={self.style!r}: must be one of {list(PAIR_STYLES)}")

    def apply(self, conv: Conversation) -> Conversation:
        """``conv`` in this style; instructions (and already styled pairs) come back unchanged."""
        if conv.kind == "caption" and len(conv.turns) == 1 and conv.media_in:
            ((human, caption),) = conv.turns
            caption = clean_caption(caption) if self.clean_captions else caption
            if self.style == "legacy":
                human = f"{modality_registry.get(conv.media_in[0][0]).placeholder} {self.caption_prompt}"
            return dataclasses.replace(conv, turns=[(human, caption)])
        if conv.kind == "generate" and len(conv.turns) == 1 and len(conv.captions_out) == 1:
            ((human, answer),) = conv.turns
            name, raw = conv.captions_out[0]
            caption = clean_caption(raw) if self.clean_captions else raw
            if self.style == "legacy":
                human, answer = caption, f"{caption} {modality_registry.get(name).placeholder}"
            else:
                human = human.replace(raw, caption)
            return dataclasses.replace(conv, turns=[(human, answer)])  # captions_out: the raw target text
        return conv


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    media_slots: list[tuple[int, str, int]]  # (start, modality, index into media_in)
    signal_groups: list[tuple[int, str, int]]  # (start, modality, index into captions_out)
    truncated: bool = False


def take(items, name: str, key: str, what: str) -> int:
    """The index of the next of ``items`` ((index, (modality, value)) pairs) for placeholder ``<name>``,
    or an error naming the sample when there is none or it is another modality's."""
    try:
        index, (item, _) = next(items)
    except StopIteration:
        raise ValueError(f"sample {key!r}: placeholder <{name}> has no {what}") from None
    if item != name:
        raise ValueError(f"sample {key!r}: placeholder <{name}> but the {what} is {item!r}")
    return index


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
            index = take(items, name, conv.key, what)
            start = len(ids)
            span_ids, span_labels = expand(name)
            ids.extend(span_ids)
            labels.extend(span_labels)
            records.append((start + offset, name, index))
            spans.append((start, len(ids)))
            pos = m.end()
        text(t[pos:], labelled)

    if template.legacy:
        return encode_legacy(
            conv,
            tokenizer,
            layout,
            template,
            num_media_tokens=num_media_tokens,
            max_length=max_length,
            slot_id=slot_id,
        )
    if template.chat:  # the tokenizer's own format; its rendering carries the BOS where it has one
        for chunk, is_answer in chat_chunks(conv.turns, tokenizer):
            if is_answer:
                turn(chunk, True, caption_iter, "output caption", signal_group, groups, 0)
            else:
                turn(chunk, False, media_iter, "input media", media_slot, slots, 1)
        return _truncate(Encoded(ids, labels, slots, groups), spans, max_length)
    if tokenizer.bos_token_id is not None:
        ids.append(tokenizer.bos_token_id)
        labels.append(IGNORE_INDEX)
    text(template.system, False)
    for i, (h, a) in enumerate(conv.turns):
        if i:
            text(template.turn_sep, False)
        text(template.opener(i), False)
        turn(h, False, media_iter, "input media", media_slot, slots, 1)
        text(template.assistant, False)
        if a:
            turn(a, True, caption_iter, "output caption", signal_group, groups, 0)
            text(template.answer_end, True)

    return _truncate(Encoded(ids, labels, slots, groups), spans, max_length)


def _truncate(enc: Encoded, spans: Sequence[tuple[int, int]], max_length: int) -> Encoded:
    """Cut ``enc`` to ``max_length`` tokens without splitting an atomic span (a media slot or a
    signal group: one cut through is dropped whole)."""
    if len(enc.input_ids) <= max_length:
        return enc
    cut = max_length
    for s, e in spans:
        if s < cut < e:
            cut = s
    return Encoded(
        enc.input_ids[:cut],
        enc.labels[:cut],
        [s for s in enc.media_slots if s[0] < cut],
        [g for g in enc.signal_groups if g[0] < cut],
        True,
    )


# --- the original NExT-GPT's pieces -------------------------------------------------------------
@dataclass(frozen=True)
class Piece:
    """One unit of the original's tokenisation: a text tokenised whole, or a media item's slots."""

    text: str = ""
    labelled: bool = False
    media: tuple[str, int] | None = None  # (modality, index into media_in): the item's projected tokens


def legacy_pieces(
    conv: Conversation,
    template: Template,
    marker_text: Mapping[str, tuple[str, str]],
    signal_text: Mapping[str, str],
) -> list[Piece]:
    """``conv`` as the pieces the original builds (``model/common/utils.py`` ``build_one_instance_stage_1/2/3``
    and ``prompt_wrap``), in order.

    - The first opener (``### Human: ``) is a piece of its own; when the first human text starts with
      a media placeholder it is ``### Human: <Img>``, the media follows, then ``</Img> `` opens the rest.
    - A human text and the ``\n### Assistant: `` after it are one piece; a later turn's piece starts
      with ``Human: `` (the previous answer's ``\n###`` closed it).
    - An answer is one labelled piece: its text, each output placeholder replaced by the modality's
      signal tokens joined by spaces right after the text before it (``{caption}[IMG0] [IMG1]...``),
      then ``\n###``.
    """
    pattern = placeholder_pattern()
    pieces: list[Piece] = []
    media = iter(enumerate(conv.media_in))

    def flush(text: str, labelled: bool) -> None:
        if text:
            pieces.append(Piece(text, labelled))

    if template.system:
        flush(template.system, False)
    for i, (human, answer) in enumerate(conv.turns):
        cur = template.opener(i)
        if i == 0 and not pattern.match(human):
            flush(cur, False)  # prompt_wrap's p_before, tokenised apart from the instance's text
            cur = ""
        pos = 0
        for m in pattern.finditer(human):
            name = m.group(1)
            index = take(media, name, conv.key, "input media")
            opener, closer = marker_text[name]
            before = human[pos : m.start()]
            flush(cur + (before.lstrip() if pos else before) + opener, False)
            pieces.append(Piece(media=(name, index)))
            cur = closer + " "  # "</Img> " + the text after the placeholder, as the original
            pos = m.end()
        flush(cur + (human[pos:].lstrip() if pos else human) + template.assistant, False)
        if not answer:
            continue
        text, pos = "", 0
        for m in pattern.finditer(answer):
            text += answer[pos : m.start()].rstrip() + signal_text[m.group(1)]
            pos = m.end()
        flush(text + answer[pos:] + template.answer_end, True)
    return pieces


@functools.lru_cache(maxsize=16)
def _split_at(tokens: tuple[str, ...]) -> re.Pattern:
    """A pattern splitting text at any of ``tokens`` (longest first), kept: compiled once per
    vocabulary, not once per piece of every sample."""
    return re.compile("(" + "|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True)) + ")")


def tokenize_legacy(text: str, tokenizer, special: Mapping[str, int]) -> list[int]:
    """Token ids of one piece as the original's tokenizer (transformers 4.29, slow LLaMA) gave them:
    split at the added tokens, whitespace next to an added token stripped, each text run tokenised
    on its own. Exact on any tokenizer version, since the split is done here."""
    if not special:
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    parts = [p for p in _split_at(tuple(sorted(special))).split(text) if p != ""]
    ids: list[int] = []
    for j, part in enumerate(parts):
        if part in special:
            ids.append(special[part])
            continue
        if j > 0 and parts[j - 1] in special:
            part = part.lstrip()
        if j + 1 < len(parts) and parts[j + 1] in special:
            part = part.rstrip()
        if part:
            ids.extend(tokenizer(part, add_special_tokens=False)["input_ids"])
    return ids


def encode_legacy(
    conv: Conversation,
    tokenizer,
    layout: TokenLayout,
    template: Template,
    *,
    num_media_tokens: int,
    max_length: int,
    slot_id: int,
) -> Encoded:
    """The original's ids and labels for ``conv`` (see :func:`legacy_pieces`): BOS and every prompt
    piece -100, each media item ``num_media_tokens`` slots (-100), answers labelled whole."""
    marker_text = {
        name: tuple(tokenizer.convert_ids_to_tokens(list(ids))) for name, ids in layout.marker_ids.items()
    }
    signal_strings = {
        name: tokenizer.convert_ids_to_tokens(list(ids)) for name, ids in layout.signal_ids.items()
    }
    signal_text = {name: " ".join(toks) for name, toks in signal_strings.items()}
    special = {
        t: i
        for name in layout.marker_ids
        for t, i in zip(marker_text[name], layout.marker_ids[name], strict=False)
    }
    special.update(
        {
            t: i
            for name, ids in layout.signal_ids.items()
            for t, i in zip(signal_strings[name], ids, strict=False)
        }
    )
    ids: list[int] = []
    labels: list[int] = []
    slots: list[tuple[int, str, int]] = []
    groups: list[tuple[int, str, int]] = []
    spans: list[tuple[int, int]] = []
    if tokenizer.bos_token_id is not None:
        ids.append(tokenizer.bos_token_id)
        labels.append(IGNORE_INDEX)
    outputs = iter(enumerate(conv.captions_out))
    first_signal = {ids_[0]: name for name, ids_ in layout.signal_ids.items()}
    for piece in legacy_pieces(conv, template, marker_text, signal_text):
        start = len(ids)
        if piece.media is not None:
            ids.extend([slot_id] * num_media_tokens)
            labels.extend([IGNORE_INDEX] * num_media_tokens)
            slots.append((start, *piece.media))
            spans.append((start, len(ids)))
            continue
        toks = tokenize_legacy(piece.text, tokenizer, special)
        ids.extend(toks)
        labels.extend(toks if piece.labelled else [IGNORE_INDEX] * len(toks))
        if not piece.labelled:
            continue
        for offset, t in enumerate(toks):
            if t not in first_signal:
                continue
            name = first_signal[t]
            index = take(outputs, name, conv.key, "output caption")
            groups.append((start + offset, name, index))
            spans.append((start + offset, start + offset + len(layout.signal_ids[name])))
    return _truncate(Encoded(ids, labels, slots, groups), spans, max_length)


def prompt_for_generation(turns: Sequence[tuple[str, str]], next_human: str) -> list[tuple[str, str]]:
    """History plus a new human turn with an empty answer: what the model continues from."""
    return [*turns, (next_human, "")]
