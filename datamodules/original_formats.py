"""The original NExT-GPT's stage-3 instruction files, read as they ship (``dataset.sources[i].format``).

A source in one of these formats names its JSON file (``file:``) and the folder its media names are
relative to (``root:``, holding ``images/`` etc. as the NExT-GPT layout does). Each entry becomes a
modality-neutral ``Conversation`` for the ``instruct`` objective (stage 3):

- ``t2x``: the legacy code's text -> text + X files (``IT_data/T-T+X_data/{image,video,audio}_t2x.json``,
  read by ``T2XTInstructionDataset``): ``{"mm_name", "conversation": [{"from": "human", "value",
  "input_modality": "text"}, {"from": "gpt", "value", "caption", "output_modality"}]}``. The original
  appends the output modality's signal tokens to the gpt value (``build_one_instance_stage_3``);
  here its placeholder is appended, which encodes to those tokens. The alignment target is the
  turn's ``caption``, embedded by the decoder's own text encoder: the shipped
  ``<embed_path>/<mm_name>.npy`` files are that same encoder's embedding of that same raw caption
  (``process_embeddings.py``), so they are not read.
- ``llava``: LLaVA-Instruct-150K as Hugging Face ships it (``{"id", "image", "conversations"}``,
  ``<image>`` in the first human value) and as the legacy code converts it (``load_llava``:
  ``{"image_name", "conversation"}``, the image before the first human value).
- ``alpaca``: Alpaca as it ships (``{"instruction", "input", "output"}``; the human turn is the
  instruction, then the input on a new line when there is one) and as the legacy code converts it
  (``load_alpaca``: a ``conversation`` of text turns).
- ``mosit``: the current code's MosIT and T-T+X files (``prepare_data.py``): ``{"<m>_captions": [...],
  "<m>_caption_embeddings": [...], "conversations": [...]}``, any modality in and out: each
  ``<image>`` in a gpt value is the next of ``image_captions``; input media, where an entry has them,
  are ``input_<m>`` (one name or a list), one per ``<m>`` in the human values.

A malformed entry is skipped and counted with its reason, as in :mod:`datamodules.nextgpt_layout`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from datamodules.entries import Skip, _media, _text, pair_turns
from datamodules.records import Entry, Message
from nextgpt import modality as modality_registry
from nextgpt.prompts import Conversation


def _messages(entry: Entry) -> list[Message]:
    conv = entry.get("conversation", entry.get("conversations"))  # the legacy files say "conversation"
    if not isinstance(conv, list) or not conv:
        raise Skip("missing or empty conversation(s)")
    return conv


def _t2x(entry: Entry, modality: str, root: Path, index: int) -> Conversation:
    messages = _messages(entry)
    captions_out = []

    def answer(msg: Message) -> str:
        out = msg.get("output_modality", "text")
        if out == "text":
            return msg["value"]
        if out not in modality_registry.names():
            raise Skip(f"unknown output_modality {out!r}")
        captions_out.append((out, _text(msg, "caption")))
        return f"{msg['value'].rstrip()} {modality_registry.get(out).placeholder}"

    turns = pair_turns(messages, answer)
    if not captions_out:
        raise Skip("no turn with an output modality (t2x entries generate media)")
    return Conversation(
        f"t2x-{Path(str(entry.get('mm_name', index))).name}", turns, captions_out=captions_out
    )


def _llava(entry: Entry, modality: str, root: Path, index: int) -> Conversation:
    mod = modality_registry.get("image")
    turns = pair_turns(_messages(entry))
    name = entry.get("image", entry.get("image_name"))
    if name is None:  # a text-only LLaVA conversation
        return Conversation(f"llava-{entry.get('id', index)}", turns)
    media_in = [("image", _media(root, mod, _text({"image": name}, "image")))]
    if not any(mod.placeholder in h for h, _ in turns):
        turns[0] = (
            f"{mod.placeholder}\n{turns[0][0]}",
            turns[0][1],
        )  # the legacy files put the image before the text
    if sum(h.count(mod.placeholder) for h, _ in turns) != 1:
        raise Skip("more than one <image> for one image")
    return Conversation(f"llava-{entry.get('id', Path(str(name)).stem)}", turns, media_in=media_in)


def _alpaca(entry: Entry, modality: str, root: Path, index: int) -> Conversation:
    if "instruction" in entry:
        instruction = _text(entry, "instruction")
        extra = entry.get("input") or ""
        if not isinstance(extra, str) or not isinstance(entry.get("output"), str):
            raise Skip("input / output are not strings")
        human = f"{instruction}\n{extra.strip()}" if extra.strip() else instruction
        return Conversation(f"alpaca-{index}", [(human, entry["output"])])
    return Conversation(f"alpaca-{index}", pair_turns(_messages(entry)))


def _names(value: Any, field: str) -> list[str]:
    names = value if isinstance(value, list) else [value]
    if not all(isinstance(n, str) and n.strip() for n in names):
        raise Skip(f"{field} holds something other than file names")
    return names


def _mosit(entry: Entry, modality: str, root: Path, index: int) -> Conversation:
    turns = pair_turns(_messages(entry))
    media_in, captions_out = [], []
    # the order of the placeholders in the text is the order of the media and captions
    for mod in map(modality_registry.get, modality_registry.names()):
        found = entry.get(mod.captions_field, [])
        outs: list[Any] = found if isinstance(found, list) else [found]
        n_out = sum(a.count(mod.placeholder) for _, a in turns)
        if n_out != len(outs):
            raise Skip(f"{n_out} {mod.placeholder} in the answers but {len(outs)} {mod.captions_field}")
        captions_out += [(mod.name, _text(Entry(caption=c), "caption")) for c in outs]
        ins = _names(entry.get(mod.input_field), mod.input_field) if mod.input_field in entry else []
        n_in = sum(h.count(mod.placeholder) for h, _ in turns)
        if n_in != len(ins):
            raise Skip(f"{n_in} {mod.placeholder} in the requests but {len(ins)} {mod.input_field}")
        media_in += [(mod.name, _media(root, mod, n)) for n in ins]
    return Conversation(
        f"mosit-{entry.get('id', index)}",
        turns,
        media_in=_text_order([h for h, _ in turns], media_in),
        captions_out=_text_order([a for _, a in turns], captions_out),
    )


def _text_order(texts: list[str], items: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Items of several modalities, each modality's in its own order, in the order their
    placeholders appear in ``texts`` (what the encoder pairs media and captions with)."""
    queues: dict[str, list[tuple[str, str]]] = {}
    for item in items:
        queues.setdefault(item[0], []).append(item)
    marks = {modality_registry.get(m).placeholder: m for m in queues}
    out = []
    for text in texts:
        at = 0
        while True:
            found = [(pos, p) for p in marks if (pos := text.find(p, at)) >= 0]
            if not found:
                break
            pos, p = min(found)
            out.append(queues[marks[p]].pop(0))
            at = pos + len(p)
    return out


READERS: dict[str, Callable[[Entry, str, Path, int], Conversation]] = {
    "t2x": _t2x,
    "llava": _llava,
    "alpaca": _alpaca,
    "mosit": _mosit,
}
