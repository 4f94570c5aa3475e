"""experiment=nextgpt_legacy: the original's samples, text and label mask, and its output projector.

The expected strings are written out from NExT-GPT-Lagacy/code/model/common/utils.py
(``build_one_instance_stage_1``, ``build_one_instance_stage_2``, ``build_one_instance_stage_3``) and
``anyToImageVideoAudio.py:prompt_wrap``, which puts ``### Human: `` (``### Human: <Img>`` + the media
embedding when there is one) before them, after a BOS.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from nextgpt.config import compose
from nextgpt.model_spec import ModelSpec
from nextgpt.projectors import OutputProjector
from nextgpt.prompts import (
    IGNORE_INDEX,
    Conversation,
    PairStyle,
    clean_caption,
    encode_conversation,
    get_template,
    legacy_pieces,
    tokenize_legacy,
)
from nextgpt.schema import validate
from nextgpt.tokens import add_nextgpt_tokens

SLOT = 0
N_MEDIA = 1  # the original's Linear(1024 -> 4096): one token per item
SIGNALS = {"image": "[IMG0] [IMG1] [IMG2] [IMG3]"}


@pytest.fixture(scope="module")
def legacy_cfg(tmp_path_factory):
    cfg = compose(["experiment=nextgpt_legacy", "model=tiny"], output_dir=str(tmp_path_factory.mktemp("cfg")))
    validate(cfg)
    return cfg


@pytest.fixture(scope="module")
def tok(tiny_cache, legacy_cfg):
    tokenizer = AutoTokenizer.from_pretrained(tiny_cache / "tiny_backbones" / "llm")
    counts = {name: int(m.num_signal_tokens) for name, m in legacy_cfg.model.modalities.items()}
    layout = add_nextgpt_tokens(tokenizer, counts, markers=legacy_cfg.model.markers)
    return tokenizer, layout


def special_ids(tokenizer, layout) -> dict[str, int]:
    names = [*layout.markers, *layout.signals]
    return dict(zip(names, tokenizer.convert_tokens_to_ids(names), strict=False))


def original_ids(tokenizer, layout, pieces: list[tuple[str | None, bool]]) -> tuple[list[int], list[int]]:
    """The original's procedure on its pieces: BOS, each piece tokenised on its own (None: the media
    embedding), labels only on answer pieces."""
    special = special_ids(tokenizer, layout)
    ids, labels = [tokenizer.bos_token_id], [IGNORE_INDEX]
    for text, labelled in pieces:
        toks = [SLOT] * N_MEDIA if text is None else tokenize_legacy(text, tokenizer, special)
        ids += toks
        labels += toks if labelled else [IGNORE_INDEX] * len(toks)
    return ids, labels


def encode(legacy_cfg, tok, conv):
    tokenizer, layout = tok
    return encode_conversation(
        conv,
        tokenizer,
        layout,
        get_template(legacy_cfg.model.llm.template),
        num_media_tokens=N_MEDIA,
        max_length=512,
        slot_id=SLOT,
    )


def piece_texts(legacy_cfg, tok, conv) -> list[tuple[str | None, bool]]:
    tokenizer, layout = tok
    markers = {n: tuple(tokenizer.convert_ids_to_tokens(list(i))) for n, i in layout.marker_ids.items()}
    signals = {n: " ".join(tokenizer.convert_ids_to_tokens(list(i))) for n, i in layout.signal_ids.items()}
    return [
        (None if p.media else p.text, p.labelled)
        for p in legacy_pieces(conv, get_template(legacy_cfg.model.llm.template), markers, signals)
    ]


def test_the_experiment_sets_every_row_of_the_original(legacy_cfg):
    assert legacy_cfg.model.markers == "shared" and legacy_cfg.model.llm.template == "vicuna_v0_legacy"
    op = legacy_cfg.model.output_projector
    assert (op.norm_first, op.dropout, op.query_std) == (True, 0.0, 1.0)
    assert dict(legacy_cfg.dataset.pairs) == {
        "style": "legacy",
        "caption_prompt": "generate a caption",
        "clean_captions": True,
    }
    assert legacy_cfg.dataset.mix == "balanced"
    assert list(legacy_cfg.stage.optim.betas) == [0.9, 0.95] and legacy_cfg.stage.optim.lr == 5e-4
    assert legacy_cfg.stage.optim.scheduler.warmup_type == "log"
    assert legacy_cfg.model.vocab_rows == "all" and legacy_cfg.model.encoder.renormalize is False


def test_caption_cleaning_is_the_originals_process_caption():
    assert clean_caption('A "Red" (big) circle: *on* #blue; ~sky~\n') == "a red big circle on blue sky"
    assert clean_caption("Two  spaces") == "two spaces"


def test_tokenisation_strips_whitespace_beside_new_tokens_as_transformers_4_29(tok):
    tokenizer, layout = tok
    special = special_ids(tokenizer, layout)
    plain = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    img_open, img_close = layout.marker_ids["image"]
    assert tokenize_legacy("### Human: <Img>", tokenizer, special) == plain("### Human:") + [img_open]
    assert tokenize_legacy("</Img> generate a caption", tokenizer, special) == [img_close] + plain(
        "generate a caption"
    )
    sig = list(layout.signal_ids["image"])
    assert tokenize_legacy("a dog[IMG0] [IMG1] [IMG2] [IMG3]\n###", tokenizer, special) == plain(
        "a dog"
    ) + sig + plain("###")


def test_stage1_sample_is_the_originals(legacy_cfg, tok):
    raw = Conversation(
        "k",
        [("<image>\nDescribe this image briefly.", 'A Dog: "on" the Beach')],
        media_in=[("image", "x.jpg")],
        kind="caption",
    )
    conv = PairStyle(**legacy_cfg.dataset.pairs).apply(raw)
    pieces = piece_texts(legacy_cfg, tok, conv)
    assert pieces == [
        ("### Human: <Img>", False),
        (None, False),
        ("</Img> generate a caption\n### Assistant: ", False),
        ("a dog on the beach\n###", True),
    ]
    enc = encode(legacy_cfg, tok, conv)
    assert (enc.input_ids, enc.labels) == original_ids(*tok, pieces)
    tokenizer, _ = tok
    assert tokenizer.decode([t for t in enc.labels if t != IGNORE_INDEX]) == "a dog on the beach\n###"
    ((start, name, index),) = enc.media_slots
    assert (
        (name, index) == ("image", 0) and enc.input_ids[start] == SLOT and enc.labels[start] == IGNORE_INDEX
    )


def test_stage2_sample_echoes_the_caption_before_the_signal_tokens(legacy_cfg, tok):
    raw = Conversation(
        "k",
        [("Generate an image: A Red circle", "<image>")],
        captions_out=[("image", "A Red circle")],
        kind="generate",
    )
    conv = PairStyle(**legacy_cfg.dataset.pairs).apply(raw)
    # the LLM reads and writes the cleaned caption; the alignment target is the raw one, as the
    # original's process_embeddings.py encodes it (CLAP is case-sensitive)
    assert conv.captions_out == [("image", "A Red circle")]
    pieces = piece_texts(legacy_cfg, tok, conv)
    assert pieces == [
        ("### Human: ", False),
        ("a red circle\n### Assistant: ", False),
        (f"a red circle{SIGNALS['image']}\n###", True),
    ]
    enc = encode(legacy_cfg, tok, conv)
    assert (enc.input_ids, enc.labels) == original_ids(*tok, pieces)
    tokenizer, layout = tok
    ((start, name, _),) = enc.signal_groups
    sig = list(layout.signal_ids["image"])
    assert name == "image" and enc.input_ids[start : start + 4] == sig == enc.labels[start : start + 4]
    labelled = [t for t in enc.labels if t != IGNORE_INDEX]
    assert tokenizer.decode([t for t in labelled if t not in sig]).startswith(
        "a red circle"
    )  # CE on the echo


def test_two_turn_stage3_sample_has_no_doubled_separator(legacy_cfg, tok):
    conv = Conversation(
        "k",
        [("<image>\nWhat is shown?", "A cat on a sofa."), ("Draw it at night.", "Here it is. <image>")],
        media_in=[("image", "x.jpg")],
        captions_out=[("image", "a cat on a sofa at night")],
    )
    pieces = piece_texts(legacy_cfg, tok, conv)
    assert pieces == [
        ("### Human: <Img>", False),
        (None, False),
        ("</Img> What is shown?\n### Assistant: ", False),
        ("A cat on a sofa.\n###", True),
        ("Human: Draw it at night.\n### Assistant: ", False),
        (f"Here it is.{SIGNALS['image']}\n###", True),
    ]
    enc = encode(legacy_cfg, tok, conv)
    assert (enc.input_ids, enc.labels) == original_ids(*tok, pieces)
    assert [g[1] for g in enc.signal_groups] == ["image"] and len(enc.media_slots) == 1


def test_our_template_no_longer_doubles_the_separator_between_turns(tok):
    tokenizer, layout = tok
    conv = Conversation("k", [("hi", "hello"), ("and now?", "bye")])
    enc = encode_conversation(
        conv, tokenizer, layout, get_template("vicuna_v0"), num_media_tokens=1, max_length=512, slot_id=SLOT
    )
    text = tokenizer.decode(enc.input_ids, skip_special_tokens=True)
    assert "".join(text.split()).count("######") == 0, text  # was "...\n### ### Human: ..."
    assert "".join(text.split()) == "###Human:hi###Assistant:hello###Human:andnow?###Assistant:bye###"


def test_shared_markers_put_img_around_every_modality(tok):
    tokenizer, layout = tok
    assert layout.markers == ("<Img>", "</Img>")
    assert layout.marker_ids["audio"] == layout.marker_ids["video"] == layout.marker_ids["image"]


@pytest.mark.parametrize(
    "out_dim,out_seq,expected", [(768, 77, 31_958_784), (1024, 77, 32_090_112), (512, 1, 31_788_544)]
)
def test_legacy_output_projector_matches_the_originals_textfclayer(out_dim, out_seq, expected, tmp_path):
    op = compose(["model=nextgpt_7b_legacy"], output_dir=str(tmp_path)).model.output_projector
    with torch.device("meta"):
        proj = OutputProjector(4096, out_dim, out_seq, **op)
    assert sum(p.numel() for p in proj.parameters()) == expected  # image, video, audio at the 7B shapes
    layers = [*proj.transformer.encoder.layers, *proj.transformer.decoder.layers]
    assert all(layer.norm_first for layer in layers) and len(layers) == 8
    assert all(m.p == 0.0 for m in proj.modules() if isinstance(m, torch.nn.Dropout))
    real = OutputProjector(
        64,
        16,
        77,
        d_model=32,
        nhead=2,
        num_encoder_layers=1,
        num_decoder_layers=1,
        dim_feedforward=64,
        query_std=1.0,
    )
    assert 0.8 < float(real.queries.std()) < 1.2  # randn, as the original's query_embs


@pytest.mark.parametrize("stage,lr,batch", [(1, 1e-3, 4), (2, 2e-4, 2), (3, 2e-4, 56)])
def test_v15_experiment_has_the_current_codes_numbers(stage, lr, batch, tmp_path):
    cfg = compose(["experiment=nextgpt_v15", f"stage={stage}"], output_dir=str(tmp_path))
    validate(cfg)
    assert (cfg.stage.optim.lr, cfg.stage.batch_size, cfg.dataset.max_length) == (lr, batch, 2048)
    assert cfg.model.name == "nextgpt_7b_v15" and cfg.model.lora.target_modules == "all-linear"
    assert (
        cfg.stage.optim.scheduler._target_.endswith("warmup_cosine_decay")
        and cfg.stage.optim.weight_decay == 0.0
    )


def test_lora_on_every_linear_layer(tiny_config):
    from nextgpt.model import build_nextgpt

    cfg = tiny_config("model.lora.target_modules=all-linear")
    spec = ModelSpec.from_config(cfg.model)
    model, _, _ = build_nextgpt(spec)
    model.apply_lora(spec.need_lora())
    adapted = {
        n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in model.llm.named_parameters() if ".lora_A" in n
    }
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= adapted, adapted
    assert "lm_head" not in adapted


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_legacy_experiment_composes_and_validates_at_7b(stage, tmp_path):
    cfg = compose(
        ["experiment=nextgpt_legacy", "model=nextgpt_7b_legacy", f"stage={stage}"], output_dir=str(tmp_path)
    )
    validate(cfg)  # loads nothing
    assert cfg.model.name == "nextgpt_7b_legacy" and cfg.model.input_projector.num_tokens == 1
    assert (cfg.model.lora.r, cfg.model.lora.alpha, cfg.model.lora.dropout) == (32, 32, 0.1)
    weights = dict(cfg.stage.loss.get("align_by_modality") or {})
    assert weights == ({"video": 2.0} if stage == 3 else {})
