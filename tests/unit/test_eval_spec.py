"""The evaluation spec (``nextgpt.evaluation.spec``): the composed ``evaluate`` config resolved once
into frozen, typed parts, a value that can not be used named by its key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from nextgpt.config import ConfigError, compose
from nextgpt.evaluation.spec import EvalSpec, eval_spec


def _spec(tmp_path: Path, *overrides: str) -> EvalSpec:
    cfg = compose(
        [f"paths.root={tmp_path}", *overrides], config_name="evaluate", output_dir=str(tmp_path / "run")
    )
    return eval_spec(cfg)


def test_a_benchmark_task_resolves_to_its_spec(tmp_path: Path):
    spec = _spec(tmp_path, "task=t2i_coco", "limit=3", "batch_size=2", "metrics.max_video_frames=0")
    task = spec.benchmark_task()
    assert spec.heldout is None and (spec.name, task.kind, task.modality) == ("t2i_coco", "generate", "image")
    assert (spec.limit, spec.batch_size, spec.seed, spec.device) == (3, 2, 0, "cpu")
    assert spec.output_dir == tmp_path / "run" and spec.checkpoint == f"{tmp_path}/bundles/stage3"
    assert task.benchmark.reader == "coco" and task.benchmark.root == f"{tmp_path}/data/T_X_pair_data/coco"
    assert task.benchmark.recorded["options"] == dict(task.benchmark.options)
    assert task.generation.max_new_tokens == 32 and task.generation.decode
    assert (
        task.metrics == ("fid", "clip_score", "trigger_rate", "align_loss") and task.paper["fid"]["nextgpt"]
    )
    assert task.prompt.startswith("Please make an image of") and task.answer
    assert spec.metrics.fad_backbone == "vggish" and spec.metrics.max_video_frames is None
    assert spec.metrics.inception is not None and spec.metrics.inception.endswith(".pth")
    assert spec.loggers == ()
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.limit = 1  # type: ignore[misc]


def test_heldout_loss_resolves_its_data_module_but_the_keys_evaluate_sets(tmp_path: Path):
    spec = _spec(tmp_path, "objective=caption")
    assert spec.task is None and spec.heldout is not None
    assert spec.heldout.objective == "caption" and spec.heldout.dataset == "synthetic"
    node = spec.heldout.datamodule
    assert node["_target_"] == "datamodules.json_datamodule.NextGPTDataModule"
    assert [s["name"] for s in node["sources"]] == ["synthetic_image", "synthetic_audio", "synthetic_video"]
    assert not {"objective", "model", "template", "batch_size", "seed"} & set(node)
    with pytest.raises(ValueError, match="heldout_loss is not a benchmark task"):
        spec.benchmark_task()


def test_a_wandb_logger_is_named_by_the_task(tmp_path: Path):
    spec = _spec(tmp_path, "task=i2t_coco", "logger=wandb")
    (node,) = spec.loggers
    assert node["_target_"].endswith("WandbLogger") and node["save_dir"] == str(tmp_path / "run")
    assert (node["name"], node["tags"]) == ("eval-i2t_coco", ["evaluate", "i2t_coco"])


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        (
            "task.kind=translate",
            "task.kind='translate': must be one of ['caption', 'generate'] (task i2t_coco)",
        ),
        ("limit=many", "limit='many': must be an integer"),
        ("batch_size=0", "batch_size=0: must be an integer >= 1"),
        ("task.generation.top_p=high", "task.generation.top_p='high': must be a number"),
    ],
)
def test_a_value_that_can_not_be_used_is_named_by_its_key(tmp_path: Path, override: str, needle: str):
    with pytest.raises(ConfigError) as e:
        _spec(tmp_path, "task=i2t_coco", override)
    assert needle in str(e.value)
