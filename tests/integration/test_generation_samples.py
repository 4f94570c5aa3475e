"""The sample-generation callback logs a W&B table (offline) and files + metrics for CSV."""

from __future__ import annotations

import csv
import json

import pytest

from nextgpt.cli.train import train

pytestmark = pytest.mark.slow


def test_samples_are_logged_to_wandb_and_csv(tiny_config, tmp_path):
    cfg = tiny_config(
        "stage=1",
        "trainer.max_steps=2",
        "stage.batch_size=4",
        "print_config=false",
        "logger=[wandb,csv]",
        "callbacks.generation_samples.max_new_tokens=8",
        "callbacks.generation_samples.prompts=[{prompt: 'Describe this.', media: []}]",
    )
    train(cfg)
    out = tmp_path / "run"
    rows = [
        json.loads(line)
        for line in (out / "samples" / "step000002" / "samples.jsonl").read_text().splitlines()
    ]
    assert [r["prompt"] for r in rows] == ["Describe this."] and all(r["step"] == 2 for r in rows)
    tables = list(out.rglob("samples_*.table.json"))
    assert len(tables) == 1
    table = json.loads(tables[0].read_text())
    assert table["columns"][:4] == ["step", "prompt", "answer", "signal_groups"] and len(table["data"]) == 1
    metrics = list(csv.DictReader(open(next(out.rglob("metrics.csv")))))
    assert any(m.get("samples/signal_groups") not in (None, "") for m in metrics)
