"""Packed batches (``dataset.pack``): several samples per row give the same loss as one sample per
row, for stages 1 and 2, and no attention crosses a sample boundary."""

from __future__ import annotations

import random

import pytest
import torch

from datamodules.nextgpt_layout import read_source
from nextgpt.batch import Collator, ConversationDataset, Item
from tests.unit.test_stages import build_stage


def items_of(cfg, module, per_modality: int = 3) -> list[Item]:
    rng = random.Random(0)
    convs = []
    for src in cfg.dataset.sources:
        found, _ = read_source(src.name, src.modality, src.root, cfg.stage.objective)
        convs += rng.sample(found, min(per_modality, len(found)))
    ds = ConversationDataset(
        convs,
        module.tokenizer,
        module.model.layout,
        cfg.dataset.template,
        int(cfg.model.input_projector.num_tokens),
        512,
    )
    return [ds[i] for i in range(len(ds))]


@pytest.mark.parametrize("stage", [1, 2])
def test_packed_and_padded_batches_give_the_same_loss(stage, tiny_config):
    cfg = tiny_config(f"stage={stage}")
    module = build_stage(cfg)
    module.model.eval()
    items = items_of(cfg, module)
    pad, n = module.tokenizer.pad_token_id, int(cfg.model.input_projector.num_tokens)
    padded = Collator(pad, n)(items)
    packed = Collator(pad, n, pack_length=256)(items)
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0] == len(items)
    assert packed["counts"] == padded["counts"] and sorted(packed["keys"]) == sorted(padded["keys"])
    assert packed["attention_mask"] is None and packed["position_ids"] is not None
    with torch.no_grad():
        a, b = module.compute_loss(padded), module.compute_loss(packed)
    assert a.keys() == b.keys() and ("align" in a) == (stage == 2)
    for term in a:
        torch.testing.assert_close(b[term], a[term], rtol=2e-5, atol=1e-6, msg=term)


def test_no_attention_crosses_a_sample_boundary(tiny_config):
    cfg = tiny_config("stage=2")
    module = build_stage(cfg)
    module.model.eval()
    items = items_of(cfg, module, per_modality=1)[:3]
    pad, n = module.tokenizer.pad_token_id, int(cfg.model.input_projector.num_tokens)
    collate = Collator(pad, n, pack_length=10_000)
    row = collate(items)
    assert row["input_ids"].shape[0] == 1  # all three in one row
    # perturb the middle sample's text tokens (not its media slots or signal tokens)
    middle = items[1]
    new_ids = list(middle.input_ids)
    first_new = module.model.layout.first_new_id
    for k in range(len(new_ids)):
        if new_ids[k] != pad and new_ids[k] < first_new:
            new_ids[k] = (new_ids[k] * 7 + 3) % first_new
    changed = collate([items[0], Item(**{**middle.__dict__, "input_ids": new_ids}), items[2]])
    with torch.no_grad():
        base = module.model(**row).logits[0]
        other = module.model(**changed).logits[0]
    starts = [0, len(items[0].input_ids), len(items[0].input_ids) + len(items[1].input_ids)]
    ends = starts[1:] + [starts[2] + len(items[2].input_ids)]
    spans = list(zip(starts, ends, strict=False))
    for k in (0, 2):  # the samples around it see nothing of the change
        s, e = spans[k]
        torch.testing.assert_close(other[s:e], base[s:e], rtol=1e-5, atol=1e-5)
    s, e = spans[1]
    assert (other[s:e] - base[s:e]).abs().max() > 1e-2  # the control: the changed sample's own logits move
