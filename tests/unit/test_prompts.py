"""Conversation -> ids/labels: loss on answers only, media slots and signal groups where expected."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from nextgpt.prompts import IGNORE_INDEX, Conversation, encode_conversation, get_template
from nextgpt.tokens import add_nextgpt_tokens

SLOT = 0


@pytest.fixture(scope="module")
def tok(tiny_cache):
    tokenizer = AutoTokenizer.from_pretrained(tiny_cache / "tiny_backbones" / "llm")
    layout = add_nextgpt_tokens(tokenizer, {"image": 4, "audio": 8, "video": 24})
    return tokenizer, layout


def encode(tok, conv, max_length=512, n=2):
    tokenizer, layout = tok
    return encode_conversation(
        conv,
        tokenizer,
        layout,
        get_template("vicuna_v0"),
        num_media_tokens=n,
        max_length=max_length,
        slot_id=SLOT,
    )


def test_new_tokens_form_a_contiguous_block(tok):
    tokenizer, layout = tok
    assert layout.first_new_id == len(tokenizer) - len(layout.markers) - len(layout.signals)
    assert len(layout.signals) == 4 + 8 + 24 and len(layout.markers) == 6
    assert tokenizer.convert_ids_to_tokens(list(layout.signal_ids["audio"]))[-1] == "[AUD7]"
    assert (
        tokenizer("a [IMG0] b", add_special_tokens=False)["input_ids"].count(layout.signal_ids["image"][0])
        == 1
    )


def test_caption_turn_labels_only_the_answer(tok):
    tokenizer, layout = tok
    conv = Conversation(
        "k", [("<image>\nDescribe this image.", "a red circle")], media_in=[("image", "x.png")]
    )
    enc = encode(tok, conv)
    assert len(enc.media_slots) == 1
    start, name, index = enc.media_slots[0]
    assert (name, index) == ("image", 0)
    assert enc.input_ids[start - 1] == layout.marker_ids["image"][0]
    assert (
        enc.input_ids[start : start + 2] == [SLOT, SLOT]
        and enc.input_ids[start + 2] == layout.marker_ids["image"][1]
    )
    answer = tokenizer.decode([t for t in enc.labels if t != IGNORE_INDEX])
    assert answer.split() == ["a", "red", "circle", "###"]  # segments decode with a joining space
    assert all(lab == IGNORE_INDEX for lab in enc.labels[: start + 3])


def test_generation_turn_puts_the_signal_group_in_the_labels(tok):
    tokenizer, layout = tok
    conv = Conversation(
        "k", [("Show me a video of a square", "Sure thing! <video>")], captions_out=[("video", "a square")]
    )
    enc = encode(tok, conv)
    ((start, name, index),) = enc.signal_groups
    sig = list(layout.signal_ids["video"])
    assert (name, index) == ("video", 0) and enc.input_ids[start : start + 24] == sig == enc.labels[
        start : start + 24
    ]


def test_multi_turn_keeps_history_and_labels_every_answer(tok):
    tokenizer, _ = tok
    conv = Conversation(
        "k", [("hi", "hello"), ("make a sound", "ok <audio>")], captions_out=[("audio", "a tone")]
    )
    enc = encode(tok, conv)
    labelled = tokenizer.decode([t for t in enc.labels if t != IGNORE_INDEX and t < 1536])
    assert "hello" in labelled and "ok" in labelled and "hi" not in labelled


def test_truncation_never_splits_a_group(tok):
    conv = Conversation("k", [("Show me a video", "Sure <video>")], captions_out=[("video", "a square")])
    full = encode(tok, conv)
    ((start, _, _),) = full.signal_groups
    cut = encode(tok, conv, max_length=start + 5)  # would cut the 24-token group
    assert cut.truncated and cut.signal_groups == [] and len(cut.input_ids) == start


@pytest.mark.parametrize(
    "conv,message",
    [
        (Conversation("k1", [("<image> what?", "x")]), "no input media"),
        (
            Conversation("k2", [("<image> what?", "x")], media_in=[("audio", "a.wav")]),
            "input media is 'audio'",
        ),
        (Conversation("k3", [("make", "<image>")]), "no output caption"),
    ],
)
def test_placeholder_mismatch_names_the_sample(tok, conv, message):
    with pytest.raises(ValueError, match=message) as err:
        encode(tok, conv)
    assert conv.key in str(err.value)
