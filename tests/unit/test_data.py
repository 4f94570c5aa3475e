"""NExT-GPT layout readers and the DataModule: bad entries and unreadable media are skipped and counted."""

from __future__ import annotations

import json
import shutil

import pytest
from transformers import AutoTokenizer

from datamodules.nextgpt_layout import OBJECTIVE_READERS, read_source
from datamodules.source_files import JSON_FILES, json_files
from nextgpt.batch import Collator, ConversationDataset
from nextgpt.tokens import add_nextgpt_tokens


@pytest.fixture
def image_source(tiny_cache, tmp_path):
    root = tmp_path / "synthetic_image"
    shutil.copytree(tiny_cache / "synthetic" / "synthetic_image", root)
    return root


def test_every_task_reads_the_synthetic_layout(image_source):
    for objective, expect in (("caption", "media_in"), ("generate", "captions_out"), ("instruct", None)):
        convs, skipped = read_source("synthetic_image", "image", image_source, objective)
        assert convs and not skipped
        if expect:
            assert all(getattr(c, expect) for c in convs)
    convs, _ = read_source("synthetic_image", "image", image_source, "instruct")
    assert any(c.media_in for c in convs) and any(c.captions_out for c in convs)
    assert len({c.key for c in convs}) == len(convs)


def test_each_json_file_of_an_objective_has_its_reader():
    """The layout's file names (``source_files.JSON_FILES``, which the identity and the path checks
    read) and their readers (``nextgpt_layout.OBJECTIVE_READERS``) are two tables: one file with no
    reader would be signed into the run key and never read."""
    assert set(JSON_FILES) == set(OBJECTIVE_READERS)
    for objective, files in JSON_FILES.items():
        assert len(files) == len(OBJECTIVE_READERS[objective]), objective


def test_bad_entries_are_skipped_and_counted(image_source):
    path = image_source / "synthetic_image.json"
    entries = json.loads(path.read_text())
    n = len(entries)
    entries += [
        {"caption": "", "image_name": "x.png", "id": "e1"},
        {"image_name": "x.png", "id": "e2"},
        {"caption": 5, "image_name": "x.png"},
        ["not", "an", "object"],
    ]
    path.write_text(json.dumps(entries))
    convs, skipped = read_source("synthetic_image", "image", image_source, "caption")
    assert len(convs) == n
    assert skipped == {
        "empty caption": 1,
        "missing caption": 1,
        "caption is int, not a string": 1,
        "entry is list, not an object": 1,
    }


def test_missing_json_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "cc3m" / "cc3m.json")):
        read_source("cc3m", "image", tmp_path / "cc3m", "caption")
    assert [p.name for p in json_files("cc3m", tmp_path, "instruct")] == [
        "cc3m_comprehension.json",
        "cc3m_generation.json",
    ]


def test_unreadable_media_is_skipped_and_counted_in_the_batch(image_source, tiny_cache, caplog):
    convs, _ = read_source("synthetic_image", "image", image_source, "caption")
    bad = convs[1].media_in[0][1]
    with open(bad, "r+b") as f:  # truncate the PNG
        f.truncate(40)
    tokenizer = AutoTokenizer.from_pretrained(tiny_cache / "tiny_backbones" / "llm")
    layout = add_nextgpt_tokens(tokenizer, {"image": 4})
    ds = ConversationDataset(convs[:4], tokenizer, layout, "vicuna_v0", num_media_tokens=2, max_length=512)
    batch = Collator(tokenizer.pad_token_id, 2)([ds[i] for i in range(4)])
    assert batch["num_skipped"] == 1 and len(batch["keys"]) == 3 and convs[1].key not in batch["keys"]
    assert batch["media"]["image"].shape[0] == 3 and int(batch["media_mask"].sum()) == 3 * 2
    assert bad in caplog.text
    assert batch["counts"] == {"tokens": int((batch["labels"][:, 1:] != -100).sum())}
    # every sample unreadable: a batch that trains nothing (no labels), never None, so every DDP rank
    # still runs the step and none waits for another in a collective
    empty = Collator(tokenizer.pad_token_id, 2)([None, None])
    assert empty["keys"] == [] and empty["num_skipped"] == 2 and empty["counts"] == {"tokens": 0}
    assert (empty["labels"] == -100).all() and not empty["media_mask"].any()
