"""The original's stage-3 instruction files, read as they ship: small files written here from the
published schemas (the legacy loaders ``T2XTInstructionDataset`` / ``TX2TInstructionDataset`` and
``preprocess_dataset.py``, LLaVA-Instruct-150K and Alpaca as Hugging Face ships them, the current
code's ``DATA_README.md``), read through ``dataset.sources[i].format`` and encoded for training."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from datamodules.nextgpt_layout import read_source
from datamodules.original_formats import READERS
from nextgpt.batch import ConversationDataset
from nextgpt.config import SOURCE_FORMATS
from nextgpt.prompts import IGNORE_INDEX

T2X = [  # IT_data/T-T+X_data/image_t2x.json (legacy): the signal tokens are not in the value, the caption is
    {
        "mm_name": "it_img_0.jpg",
        "conversation": [
            {
                "from": "human",
                "value": "I need a picture of a grey wolf playing in the snow.",
                "input_modality": "text",
            },
            {
                "from": "gpt",
                "value": "Here is a wolf rolling about in fresh snow.",
                "caption": "Gray Wolf; rollicking in the snow",
                "output_modality": "image",
            },
        ],
    },
    {
        "mm_name": "it_img_1.jpg",
        "conversation": [
            {"from": "human", "value": "Hello!", "input_modality": "text"},
            {
                "from": "gpt",
                "value": "Hi, what can I make for you?",
                "caption": "",
                "output_modality": "text",
            },
            {"from": "human", "value": "A red kite over a beach, please.", "input_modality": "text"},
            {
                "from": "gpt",
                "value": "Sure thing!",
                "caption": "a red kite over a beach",
                "output_modality": "image",
            },
        ],
    },
    {"mm_name": "bad.jpg", "conversation": [{"from": "human", "value": "Draw a cat."}]},  # no answer: skipped
]
LLAVA = [  # LLaVA-Instruct-150K as shipped, then as the legacy load_llava leaves it
    {
        "id": "000000033471",
        "image": "000000033471.jpg",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat are the colors of the bus in the image?"},
            {"from": "gpt", "value": "The bus in the image is white and red."},
            {"from": "human", "value": "What feature can be seen on the back of the bus?"},
            {"from": "gpt", "value": "The back of the bus features an advertisement."},
        ],
    },
    {
        "image_name": "000000052846.jpg",
        "output_modality": "text",
        "conversation": [
            {
                "from": "human",
                "value": "Where is the cat positioned in the image?",
                "input_modality": "image",
            },
            {
                "from": "gpt",
                "value": "The cat is on top of the bicycle.",
                "caption": "",
                "output_modality": "text",
            },
        ],
    },
]
ALPACA = [  # alpaca_data.json as shipped, then as the legacy load_alpaca leaves it
    {
        "instruction": "Give three tips for staying healthy.",
        "input": "",
        "output": "1. Eat well. 2. Move. 3. Sleep.",
    },
    {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"},
    {
        "image_name": "00000000000",
        "output_modality": "text",
        "conversation": [
            {"from": "human", "value": "Name a primary colour.", "input_modality": "text"},
            {"from": "gpt", "value": "Blue.", "caption": "", "output_modality": "text"},
        ],
    },
]
MOSIT = [  # the current code's prepare_data.py output (MosIT; its T-T+X files have the same fields)
    {
        "image_captions": ["An image of a basketball court", "A player passing the ball"],
        "image_caption_embeddings": ["mosit_i_0000002_00.jpg.npy", "mosit_i_0000002_01.jpg.npy"],
        "audio_captions": ["A crowd cheering in a gym"],
        "audio_caption_embeddings": ["mosit_a_0000002_00.wav.npy"],
        "conversations": [
            {"from": "human", "value": "I am coaching a team. Show me a court.", "input_modality": "text"},
            {"from": "gpt", "value": "Here is one: <image>", "output_modality": "image"},
            {"from": "human", "value": "And a pass, with the sound of the crowd?"},
            {"from": "gpt", "value": "A pass <image> and the crowd <audio>."},
        ],
    },
    {
        "input_image": ["court.jpg"],
        "image_captions": [],
        "conversations": [
            {"from": "human", "value": "<image>\nWhat sport is played here?"},
            {"from": "gpt", "value": "Basketball."},
        ],
    },
    {
        "image_captions": ["one"],
        "conversations": [  # two <image> in the answers, one caption: skipped
            {"from": "human", "value": "Two pictures?"},
            {"from": "gpt", "value": "<image> <image>"},
        ],
    },
]


@pytest.fixture
def files(tmp_path):
    (tmp_path / "images").mkdir()
    for name in ("000000033471.jpg", "000000052846.jpg", "court.jpg"):
        Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(tmp_path / "images" / name)
    out = {}
    for fmt, entries in (("t2x", T2X), ("llava", LLAVA), ("alpaca", ALPACA), ("mosit", MOSIT)):
        out[fmt] = tmp_path / f"{fmt}.json"
        out[fmt].write_text(json.dumps(entries))
    return tmp_path, out


def read(files, fmt, modality="image"):
    root, paths = files
    return read_source(fmt, modality, root, "instruct", fmt=fmt, file=str(paths[fmt]))


def test_every_format_has_a_reader():
    assert set(SOURCE_FORMATS) == {"nextgpt", *READERS}


def test_t2x_appends_the_signal_group_and_aligns_to_the_raw_caption(files):
    convs, skipped = read(files, "t2x")
    assert len(convs) == 2 and sum(skipped.values()) == 1
    assert convs[0].turns == [
        (
            "I need a picture of a grey wolf playing in the snow.",
            "Here is a wolf rolling about in fresh snow. <image>",
        )
    ]
    assert convs[0].captions_out == [
        ("image", "Gray Wolf; rollicking in the snow")
    ]  # raw, as the .npy was made
    assert convs[1].turns[0][1] == "Hi, what can I make for you?" and convs[1].captions_out == [
        ("image", "a red kite over a beach")
    ]


def test_llava_as_shipped_and_as_converted(files):
    root, _ = files
    convs, skipped = read(files, "llava")
    assert len(convs) == 2 and not skipped
    assert [len(c.turns) for c in convs] == [2, 1]
    assert (
        convs[1].turns[0][0] == "<image>\nWhere is the cat positioned in the image?"
    )  # the image goes first
    assert convs[0].media_in == [("image", str(root / "images" / "000000033471.jpg"))]


def test_alpaca_as_shipped_and_as_converted(files):
    convs, skipped = read(files, "alpaca")
    assert [c.turns for c in convs] == [
        [("Give three tips for staying healthy.", "1. Eat well. 2. Move. 3. Sleep.")],
        [("Translate to French.\nGood morning", "Bonjour")],
        [("Name a primary colour.", "Blue.")],
    ]
    assert all(not c.media_in and not c.captions_out for c in convs) and not skipped


def test_mosit_any_modality_in_and_out_in_text_order(files):
    convs, skipped = read(files, "mosit")
    assert len(convs) == 2 and list(skipped) == ["2 <image> in the answers but 1 image_captions"]
    assert convs[0].captions_out == [
        ("image", "An image of a basketball court"),
        ("image", "A player passing the ball"),
        ("audio", "A crowd cheering in a gym"),
    ]
    assert convs[1].media_in[0][0] == "image" and convs[1].media_in[0][1].endswith("court.jpg")


def test_the_files_encode_for_stage3_with_labels_on_the_answers(files, tiny_cache):
    """Every format through the training encoder: the signal groups of the outputs are in the labels."""
    from transformers import AutoTokenizer

    from nextgpt.tokens import add_nextgpt_tokens

    tokenizer = AutoTokenizer.from_pretrained(tiny_cache / "tiny_backbones" / "llm")
    layout = add_nextgpt_tokens(tokenizer, {"image": 4, "audio": 8, "video": 24})
    for fmt in READERS:
        convs, _ = read(files, fmt)
        ds = ConversationDataset(convs, tokenizer, layout, "vicuna_v0", num_media_tokens=1, max_length=512)
        for i, conv in enumerate(convs):
            item = ds[i]
            labelled = [t for t in item.labels if t != IGNORE_INDEX]
            assert item.captions_out == conv.captions_out, (fmt, i)
            for name, _ in conv.captions_out:
                assert layout.signal_ids[name][0] in labelled, (fmt, i)
            assert labelled, (fmt, i)


def test_a_pairs_objective_refuses_a_stage3_file_by_name(files):
    from nextgpt.runs import DataError

    with pytest.raises(DataError, match="'t2x' \\(format t2x\\) is stage-3 instruction data"):
        read_source("t2x", "image", files[0], "generate", fmt="t2x", file=str(files[1]["t2x"]))


@pytest.mark.slow
def test_stage3_trains_on_the_originals_files(files, tiny_cache, tmp_path):
    """``python train.py stage=3 dataset.sources=[...format: t2x|llava|alpaca|mosit...]``: the run
    reads each file, trains, and keys the run on the files (an edited file is another run)."""
    from tests.cli import ok, refused, train

    root, paths = files
    quiet = ["logger=csv", "callbacks.generation_samples=null", "trainer.max_steps=2"]
    ok(train(tmp_path, tiny_cache, "-m", "stage=1,2", *quiet))
    sources = ",".join(
        f"{{name: {f}, modality: {m}, root: '{root}', format: {f}, file: '{paths[f]}'}}"
        for f, m in (("t2x", "image"), ("llava", "image"), ("alpaca", "image"), ("mosit", "image"))
    )
    args = ["stage=3", *quiet, f"dataset.sources=[{sources}]", "stage.batch_size=2"]
    # the two malformed entries of 11 are counted by reason, and refused above the default 10 %
    assert "t2x: no complete human/gpt turn: 1" in refused(
        train(tmp_path, tiny_cache, *args), "max_skip_fraction"
    )
    out = ok(train(tmp_path, tiny_cache, *args, "dataset.max_skip_fraction=0.5"))
    assert "9 train / 0 val conversations (instruct)" in out and "2 trained in this run" in out, out[-3000:]
