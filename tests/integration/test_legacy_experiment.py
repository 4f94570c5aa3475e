"""`python train.py -m experiment=nextgpt_legacy model=tiny stage=1,2,3`: the original's recipe
trains each stage, chained through the bundles, with one data set per batch."""

from __future__ import annotations

import pytest
import torch

from tests.cli import bundle_meta, recorded_batches, train

pytestmark = pytest.mark.slow


def test_legacy_recipe_trains_two_steps_per_stage(tiny_cache, tmp_path):
    keys = tmp_path / "keys"
    res = train(
        tmp_path,
        tiny_cache,
        "-m",
        "experiment=nextgpt_legacy",
        "model=tiny",
        "stage=1,2,3",
        "trainer.max_steps=2",
        "logger=csv",
        "callbacks.generation_samples=null",
        "+callbacks.keys._target_=tests.helpers.RecordKeys",
        f"+callbacks.keys.path={keys}" + "${stage.number}",
    )
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    for stage in (1, 2, 3):
        assert bundle_meta(tmp_path, stage)["stage"] == stage
        batches = recorded_batches(tmp_path / f"keys{stage}")
        assert sorted(batches) == [0, 1], batches
        # the balanced mix: each batch holds one synthetic source (img_/aud_/vid_ keys), in turn
        prefixes = [{k.split("_")[0] for k in b} for _, b in sorted(batches.items())]
        assert all(len(p) == 1 for p in prefixes) and prefixes[0] != prefixes[1], prefixes
    assert out.count("2 trained in this run") == 3, out[-3000:]
    # model.vocab_rows=all: every stage trains the LLM's whole embedding and head, as the original did;
    # the old rows go into each bundle's base_rows (not its weights: their names change with LoRA),
    # carry from stage to stage, and come out of to_legacy as the full matrices
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from nextgpt.bundles import WEIGHTS
    from nextgpt.convert.__main__ import export_legacy

    base = (
        AutoModelForCausalLM.from_pretrained(tiny_cache / "tiny_backbones" / "llm")
        .get_input_embeddings()
        .weight
    )
    rows = {}
    for stage in (1, 2, 3):
        assert "vocab_rows" in bundle_meta(tmp_path, stage)["trainable_groups"]
        rows[stage] = load_file(str(tmp_path / "bundles" / f"stage{stage}" / "base_rows.safetensors"))
        weights = load_file(str(tmp_path / "bundles" / f"stage{stage}" / WEIGHTS))
        assert not [k for k in weights if "embed_tokens" in k or "lm_head" in k], list(weights)
    assert rows[1]["embed"].shape == base.shape and not torch.equal(rows[1]["embed"], base.detach())
    assert not torch.equal(rows[2]["embed"], rows[1]["embed"]) and not torch.equal(
        rows[3]["head"], rows[2]["head"]
    )
    ckpt = torch.load(
        export_legacy(tmp_path / "bundles" / "stage3", tmp_path / "stage3.pt"), weights_only=True
    )
    embed = ckpt["llama_model.base_model.model.model.embed_tokens.weight"]
    assert torch.equal(embed[: base.shape[0]], rows[3]["embed"]) and embed.shape[0] == base.shape[0] + 38


def test_a_failed_stage_stops_the_sweep_with_its_own_error(tiny_cache, tmp_path):
    """Stage 1 fails: the sweep stops there and says why (it used to go on to stage 2, whose missing
    stage-1 bundle ended the process before Hydra reported stage 1's error)."""
    res = train(
        tmp_path,
        tiny_cache,
        "-m",
        "stage=1,2",
        "trainer.max_steps=1",
        "logger=csv",
        "callbacks.generation_samples=null",
        "stage.optim.scheduler.warmup_type=bogus",
    )
    out = res.stdout + res.stderr
    assert res.returncode != 0
    assert "warmup_type must be one of" in out and "starts from the bundle" not in out, out[-3000:]
