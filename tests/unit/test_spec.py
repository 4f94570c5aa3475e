"""The run spec (``nextgpt.spec``): the composed config resolved once into frozen, typed parts."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from nextgpt.config import ConfigError, compose
from nextgpt.schema import validate
from nextgpt.spec import BatchPlan, LossSpec, OptimSpec, RunSpec, run_spec


@pytest.mark.parametrize(
    ("stage", "objective", "trains_from"),
    [("1", "caption", None), ("2", "generate", "stage1"), ("3", "instruct", "stage2")],
)
def test_each_stage_resolves_to_its_spec(stage: str, objective: str, trains_from: str | None, tmp_path: Path):
    cfg = compose([f"stage={stage}", f"paths.root={tmp_path}"])
    validate(cfg)
    spec = run_spec(cfg)
    assert isinstance(spec, RunSpec)
    assert (spec.stage.number, spec.stage.objective) == (int(stage), objective)
    assert spec.bundle == tmp_path / "bundles" / f"stage{stage}"
    assert spec.init_from == (None if trains_from is None else tmp_path / "bundles" / trains_from)
    assert spec.stage.optim.lr == float(cfg.stage.optim.lr) and spec.stage.optim.optimizer["_target_"]
    assert spec.stage.loss.ce == float(cfg.stage.loss.ce)
    assert spec.paths.features == Path(cfg.paths.cache_dir) / "features"
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.seed = 1  # type: ignore[misc]


def test_a_sweep_job_starts_from_its_own_chain_and_init_from_wins(tmp_path: Path):
    cfg = compose(["stage=3", f"paths.root={tmp_path}"])
    spec = run_spec(cfg, tag="stage.optim.lr=0.001")
    chain = tmp_path / "bundles" / "stage.optim.lr=0.001"
    assert (spec.init_from, spec.bundle) == (chain / "stage2", chain / "stage3")
    given = run_spec(compose(["stage=3", f"paths.root={tmp_path}", f"init_from={tmp_path}/mine"]))
    assert given.init_from == tmp_path / "mine"


def test_the_legacy_recipe_resolves_its_per_stage_loss_and_schedule():
    spec3 = run_spec(compose(["experiment=nextgpt_legacy", "model=tiny", "stage=3"]))
    spec2 = run_spec(compose(["experiment=nextgpt_legacy", "model=tiny", "stage=2"]))
    assert spec3.stage.loss.align_by_modality == {"video": 2.0} and spec2.stage.loss.align_by_modality == {}
    assert spec3.stage.optim.betas == (0.9, 0.95) and spec3.stage.optim.scheduler["warmup_type"] == "log"


def test_global_batch_derives_the_accumulation_or_names_the_keys_at_fault():
    cfg = compose(["stage=1", "trainer.devices=2", "dataset.batch_size=4", "stage.global_batch_size=16"])
    assert run_spec(cfg).batch == BatchPlan(devices=2, num_nodes=1, per_device=4, accumulate=2)
    assert run_spec(cfg).batch.global_batch == 16
    bad = compose(["stage=1", "trainer.devices=2", "dataset.batch_size=4", "stage.global_batch_size=12"])
    with pytest.raises(ConfigError, match=r"stage.global_batch_size=12: must be a multiple .* 2 x 1 x 4 = 8"):
        run_spec(bad)
    both = compose(
        ["stage=1", "dataset.batch_size=4", "stage.global_batch_size=16", "trainer.accumulate_grad_batches=3"]
    )
    with pytest.raises(ConfigError, match=r"trainer.accumulate_grad_batches=3: contradicts"):
        run_spec(both)


def test_specs_round_trip_through_plain_dicts():
    """What a checkpoint's hyperparameters hold (plain containers) rebuilds the same spec."""
    optim = OptimSpec.of(
        {"lr": 1e-3, "weight_decay": 0.1, "betas": [0.9, 0.95], "optimizer": {"_target_": "x"}}
    )
    assert OptimSpec.of(optim.as_dict()) == optim
    loss = LossSpec.of({"ce": 0.5, "align_by_modality": {"video": 2}})
    assert LossSpec.of(loss.as_dict()) == loss and loss.weight("ce") == 0.5 and loss.align == 1.0
