"""model.llm.template=chat: the tokenizer's own chat template, loss on the assistant's tokens only."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from nextgpt.chat_template import ChatTemplateError
from nextgpt.prompts import (
    IGNORE_INDEX,
    Conversation,
    encode_conversation,
    get_template,
    resolve_template,
)
from nextgpt.tokens import add_nextgpt_tokens

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SLOT = 0


@pytest.fixture
def tok(tiny_cache):
    tokenizer = AutoTokenizer.from_pretrained(tiny_cache / "tiny_backbones" / "llm")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML
    layout = add_nextgpt_tokens(tokenizer, {"image": 4, "audio": 8, "video": 24})
    return tokenizer, layout


def runs(labels):
    out, start = [], None
    for i, lab in enumerate([*labels, IGNORE_INDEX]):
        if lab != IGNORE_INDEX and start is None:
            start = i
        elif lab == IGNORE_INDEX and start is not None:
            out.append((start, i))
            start = None
    return out


def test_label_mask_covers_exactly_the_assistant_tokens(tok):
    tokenizer, layout = tok
    conv = Conversation(
        "k",
        [("<image>\nWhat is this?", "A cat on a sofa."), ("Draw it at night.", "Here it is. <image>")],
        media_in=[("image", "x.jpg")],
        captions_out=[("image", "a cat on a sofa at night")],
    )
    enc = encode_conversation(
        conv, tokenizer, layout, get_template("chat"), num_media_tokens=2, max_length=512, slot_id=SLOT
    )
    spans = runs(enc.labels)
    assert len(spans) == 2, spans
    for i, (lab, tid) in enumerate(zip(enc.labels, enc.input_ids, strict=False)):
        assert lab in (IGNORE_INDEX, tid), i
    decode = lambda a, b: "".join(tokenizer.decode(enc.input_ids[a:b]).split())  # noqa: E731
    assert decode(*spans[0]) == "Acatonasofa.<|im_end|>"
    assert decode(*spans[1]) == "Hereitis.[IMG0][IMG1][IMG2][IMG3]<|im_end|>"
    start_id = tokenizer.convert_tokens_to_ids("<|im_start|>")
    for a, _ in spans:  # each answer follows the template's own generation prompt, unlabelled
        before = enc.input_ids[:a]
        last_start = len(before) - 1 - before[::-1].index(start_id)
        assert "".join(tokenizer.decode(before[last_start:]).split()) == "<|im_start|>assistant"
    ((slot_start, name, _),) = enc.media_slots
    assert name == "image" and enc.input_ids[slot_start : slot_start + 2] == [SLOT, SLOT]
    assert all(enc.labels[j] == IGNORE_INDEX for j in range(slot_start - 1, slot_start + 3))
    ((g, gname, _),) = enc.signal_groups
    assert gname == "image" and enc.labels[g : g + 4] == list(layout.signal_ids["image"])
    # the prompt for generation ends with the generation prompt, nothing labelled
    gen = encode_conversation(
        Conversation("g", [("hi", "")]),
        tokenizer,
        layout,
        get_template("chat"),
        num_media_tokens=2,
        max_length=512,
        slot_id=SLOT,
    )
    assert set(gen.labels) == {IGNORE_INDEX}
    assert "".join(tokenizer.decode(gen.input_ids).split()).endswith("<|im_start|>assistant")


def test_stop_string_comes_from_the_template(tok):
    tokenizer, _ = tok
    assert resolve_template("chat", tokenizer).stop == "<|im_end|>"
    assert resolve_template("vicuna_v0", tokenizer).stop == "###"


def test_a_tokenizer_without_a_chat_template_is_refused_by_name(tok):
    tokenizer, layout = tok
    tokenizer.chat_template = None
    with pytest.raises(ChatTemplateError, match="has no chat template"):
        encode_conversation(
            Conversation("k", [("hi", "yo")]),
            tokenizer,
            layout,
            get_template("chat"),
            num_media_tokens=1,
            max_length=64,
            slot_id=SLOT,
        )
