"""Every config combination composes and validates; bad values fail fast, naming key and value."""

from __future__ import annotations

import itertools
import subprocess
import sys
import time

import pytest
from hydra.errors import HydraException, MissingConfigException
from omegaconf import OmegaConf

from nextgpt.config import CONFIG_DIR, ConfigError, compose, normalize_overrides
from nextgpt.schema import validate
from tests.conftest import REPO_ROOT

STAGES = ["1", "2", "3"]
DATASETS = sorted(p.stem for p in (CONFIG_DIR / "dataset").glob("*.yaml"))
MODELS = sorted(p.stem for p in (CONFIG_DIR / "model").glob("*.yaml"))
STRATEGIES = sorted(p.stem for p in (CONFIG_DIR / "strategy").glob("*.yaml"))


def test_config_groups_are_complete():
    assert {"synthetic", "cc3m", "webvid", "audiocap"} <= set(DATASETS)
    assert {"tiny", "nextgpt_7b_legacy", "nextgpt_7b_v15"} <= set(MODELS)
    assert {"auto", "ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero2_offload", "deepspeed_zero3"} <= set(
        STRATEGIES
    )


def pairwise(*groups: list[str]) -> list[tuple[str, ...]]:
    """Combinations in which every pair of options of any two groups occurs at least once (a greedy
    covering array): groups interact in pairs (a strategy with a model's sizes, a dataset with a
    model's modalities), and ~40 combinations cover every pair where the full product has ~400."""
    wanted = {
        (i, a, j, b)
        for i, j in itertools.combinations(range(len(groups)), 2)
        for a in groups[i]
        for b in groups[j]
    }

    def pairs(combo):
        return {(i, combo[i], j, combo[j]) for i, j in itertools.combinations(range(len(combo)), 2)}  # noqa: E731

    chosen = []
    while wanted:
        best = max(itertools.product(*groups), key=lambda c: len(pairs(c) & wanted))
        chosen.append(best)
        wanted -= pairs(best)
    return chosen


PAIRWISE = pairwise(STAGES, DATASETS, MODELS, STRATEGIES)


def test_the_pairwise_combinations_cover_every_pair():
    for (i, a), (j, b) in itertools.combinations(enumerate([STAGES, DATASETS, MODELS, STRATEGIES]), 2):
        for x, y in itertools.product(a, b):
            assert any(c[i] == x and c[j] == y for c in PAIRWISE), (x, y)
    assert len(PAIRWISE) < len(STAGES) * len(DATASETS) * len(MODELS) * len(STRATEGIES) / 4


@pytest.mark.parametrize("stage,dataset,model,strategy", PAIRWISE)
def test_every_pair_of_options_composes_and_validates(stage, dataset, model, strategy, tmp_path):
    test_every_combination_composes_and_validates(stage, dataset, model, strategy, tmp_path)


@pytest.mark.slow  # the full product; the pairwise set above covers every pair of options in the fast tier
@pytest.mark.parametrize(
    "stage,dataset,model,strategy", list(itertools.product(STAGES, DATASETS, MODELS, STRATEGIES))
)
def test_every_combination_composes_and_validates(stage, dataset, model, strategy, tmp_path):
    extra = {
        "webdataset": ["dataset.urls='/data/shards/{00000..00009}.tar'"],  # a mandatory key
        "depth": ["+model.modalities.depth={num_signal_tokens: 0, decoder: null}"],
    }.get(dataset, [])  # input-only
    cfg = compose(
        [f"stage={stage}", f"dataset={dataset}", f"model={model}", f"strategy={strategy}", *extra],
        output_dir=str(tmp_path),
    )
    validate(cfg)  # loads nothing: the 7B configs validate on a machine without their weights
    assert cfg.stage.number == int(stage)
    assert cfg.model.name == model
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves


def test_7b_configs_carry_the_reference_numbers(tmp_path):
    legacy = compose(["model=nextgpt_7b_legacy"], output_dir=str(tmp_path)).model
    assert legacy.lora.r == 32 and legacy.lora.alpha == 32 and legacy.lora.dropout == 0.1
    assert legacy.input_projector.num_tokens == 1 and legacy.encoder.arch.preset == "huge"
    assert {k: v.num_signal_tokens for k, v in legacy.modalities.items()} == {
        "image": 4,
        "audio": 8,
        "video": 24,
    }
    assert (legacy.output_projector.d_model, legacy.output_projector.nhead) == (512, 4)
    current = compose(["model=nextgpt_7b_v15"], output_dir=str(tmp_path)).model
    assert current.lora.r == 128 and current.lora.alpha == 256 and current.input_projector.num_tokens == 8
    assert current.llm.template == "vicuna_v1_1" and "v1.5" in current.llm.path


def test_stage_hyperparameters_follow_the_reference(tmp_path):
    lrs = {s: compose([f"stage={s}"], output_dir=str(tmp_path)).stage.optim.lr for s in STAGES}
    assert lrs == {"1": 4e-4, "2": 4e-4, "3": 5e-4}


def test_stage_overrides_are_quoted_for_hydra():
    assert normalize_overrides(["stage=2", "dataset=webvid"]) == ["stage='2'", "dataset=webvid"]
    assert normalize_overrides(["stage=1,2,3"]) == ["stage='1','2','3'"]
    assert normalize_overrides(["stage.optim.lr=1"]) == ["stage.optim.lr=1"]


@pytest.mark.parametrize(
    "override,key,value",
    [
        ("model.lora.r=-1", "model.lora.r", "-1"),
        ("model.lora.alpha=0", "model.lora.alpha", "0"),
        ("stage.number=4", "stage.number", "4"),
        ("stage.optim.lr=-0.1", "stage.optim.lr", "-0.1"),
        ("dataset.sources.0.modality=smell", "dataset.sources[0].modality", "smell"),
        ("+model.modalities.smell={num_signal_tokens: 2}", "model.modalities.smell", "smell"),
        ("trainer.strategy=warp_drive", "trainer.strategy", "warp_drive"),
        ("model.output_projector.nhead=3", "model.output_projector.nhead", "3"),
        (
            "model.modalities.image.decoder.conditioning=pooled",
            "model.modalities.image.decoder.conditioning",
            "pooled",
        ),
        ("model.encoder.arch.preset=giant", "model.encoder.arch", "giant"),
        ("dataset.batch_size=0", "dataset.batch_size", "0"),
    ],
)
def test_bad_values_name_key_and_value(override, key, value, tmp_path):
    cfg = compose([override], output_dir=str(tmp_path))
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    line = next((e for e in err.value.errors if e.startswith(key)), None)
    assert line is not None, err.value.errors
    assert value in line


def test_an_input_only_dataset_names_the_model_entry_it_needs(tmp_path):
    cfg = compose(["dataset=depth"], output_dir=str(tmp_path))
    with pytest.raises(
        ConfigError,
        match=r"dataset\.sources\[0\]\.modality='depth': not among the model's modalities "
        r".*\+model\.modalities\.depth=\{num_signal_tokens: 0, decoder: null\}",
    ):
        validate(cfg)


def test_overfitting_a_shard_stream_is_refused(tmp_path):
    with pytest.raises(
        ConfigError, match=r"trainer\.overfit_batches=1: a shard stream runs on across epochs"
    ):
        validate(compose(["dataset=cc3m", "debug=overfit"], output_dir=str(tmp_path)))


def test_webdataset_needs_its_urls(tmp_path):
    with pytest.raises(ConfigError, match="dataset.urls"):
        validate(compose(["dataset=webdataset"], output_dir=str(tmp_path)))


def test_unknown_stage_and_strategy_are_refused_by_hydra(tmp_path):
    with pytest.raises((MissingConfigException, HydraException), match="stage"):
        compose(["stage=4"], output_dir=str(tmp_path))
    with pytest.raises((MissingConfigException, HydraException), match="warp"):
        compose(["strategy=warp"], output_dir=str(tmp_path))


def _train(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "train.py", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize(
    "args,needle",
    [
        (["stage=4"], "stage/4"),
        (["model.lora.r=-1"], "model.lora.r=-1"),
        (["strategy=nope"], "strategy/nope"),
        (["dataset.sources.0.modality=smell"], "'smell'"),
    ],
)
@pytest.mark.slow  # a subprocess CLI
def test_train_py_fails_fast_on_bad_config(args, needle, tmp_path):
    t0 = time.perf_counter()
    res = _train(*args, f"paths.root={tmp_path}")
    assert res.returncode != 0
    assert needle in res.stderr + res.stdout
    assert time.perf_counter() - t0 < 60


@pytest.mark.slow  # a subprocess CLI
def test_missing_data_path_is_named(tmp_path):
    """`python train.py stage=1 dataset=cc3m paths.data_root=DIR trainer.max_steps=2` on an empty DIR."""
    missing = tmp_path / "nowhere"
    res = _train(
        "stage=1",
        "dataset=cc3m",
        f"paths.data_root={missing}",
        "trainer.max_steps=2",
        f"paths.root={tmp_path}",
        "model.backbones=null",
    )
    assert res.returncode == 2, res.stderr[-2000:]
    assert str(missing / "cc3m" / "cc3m.json") in res.stderr
    assert "dataset.sources[0].root" in res.stderr
