"""Every option of every config group builds what it names.

Composing and validating is not enough: a ``_target_`` that moved, or a key its class no longer
takes, only shows when the object is built. Here every option of every group is composed on the
tiny model, every ``_target_`` node in it is checked against its class's signature, and the nodes
train.py builds (callbacks, loggers, optimizer, scheduler, data module, stage module, strategy) are
really instantiated.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
from pathlib import Path

import hydra
import pytest
import torch
from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig, OmegaConf

from nextgpt.config import CONFIG_DIR, ConfigError, compose
from nextgpt.evaluation.readers import READERS
from nextgpt.model_spec import ModelSpec
from nextgpt.schema import validate

# groups of train.yaml; evaluate.yaml's own group is task/ (below); base/ holds shared dataset keys
GROUPS = sorted(
    p.name for p in CONFIG_DIR.iterdir() if p.is_dir() and p.name not in {"base", "hydra", "task"}
)
# what each group needs beside its option to compose into a runnable training config
NEEDS = {
    ("dataset", "webdataset"): ["dataset.urls=/data/shards"],
    ("dataset", "depth"): ["+model.modalities.depth={num_signal_tokens: 0, decoder: null}"],
}
# options that need hardware this machine lacks: composed, validated and signature-checked only
NO_BUILD_HERE = {("trainer", "gpu")}


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


CASES = [(g, o) for g in GROUPS for o in options(g)]


def target_nodes(node, path: str = "") -> list[tuple[str, DictConfig]]:
    """Every ``_target_`` node of a config, with its key."""
    found = []
    if isinstance(node, DictConfig):
        if "_target_" in node:
            found.append((path, node))
        for k in node:
            found += target_nodes(node._get_node(k), f"{path}.{k}" if path else str(k))
    elif isinstance(node, ListConfig):
        for i, v in enumerate(node):
            found += target_nodes(v, f"{path}[{i}]")
    return found


def check_signature(key: str, node: DictConfig) -> None:
    """The target imports, and takes every key the node passes (``**kwargs`` takes anything)."""
    target = get_object(node._target_)
    kwargs = {k: None for k in node if not str(k).startswith("_")}
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):  # a builtin without a signature
        return
    try:
        sig.bind_partial(**kwargs)
    except TypeError as e:
        raise AssertionError(f"{key}._target_={node._target_}: {e}") from e


def runnable(group: str, option: str, tmp_path: Path) -> DictConfig:
    # the train config's own run fields, filled in as train.py fills them
    overrides = [
        f"{group}={option}",
        *NEEDS.get((group, option), []),
        f"paths.root={tmp_path}",
        f"run.dir={tmp_path / 'run'}",
        f"run.bundle={tmp_path / 'bundle'}",
    ]
    return compose(overrides, output_dir=str(tmp_path))


def test_every_group_is_covered():
    assert {
        "callbacks",
        "dataset",
        "debug",
        "logger",
        "model",
        "optimizer",
        "scheduler",
        "stage",
        "strategy",
        "trainer",
    } <= set(GROUPS)
    assert {"none", "default"} <= set(options("callbacks"))


@pytest.mark.parametrize("group,option", CASES, ids=[f"{g}={o}" for g, o in CASES])
def test_every_option_builds_what_it_names(group, option, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    cfg = runnable(group, option, tmp_path)
    if (group, option) == ("logger", "tensorboard") and not any(
        importlib.util.find_spec(p) for p in ("tensorboard", "tensorboardX")
    ):
        with pytest.raises(
            ConfigError, match=r"logger\.tensorboard\._target_=.*needs tensorboard or tensorboardX"
        ):
            validate(cfg)  # named before anything loads, with the extra that installs it
        return
    validate(cfg)
    nodes = target_nodes(cfg)
    assert nodes, f"{group}={option}: nothing to instantiate"
    for key, node in nodes:
        check_signature(key, node)
    if (group, option) in NO_BUILD_HERE:
        return
    OmegaConf.resolve(cfg)
    callbacks = [hydra.utils.instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    assert all(hasattr(c, "on_train_start") for c in callbacks)
    loggers = [hydra.utils.instantiate(lg) for lg in (cfg.get("logger") or {}).values() if lg is not None]
    assert all(hasattr(lg, "log_metrics") for lg in loggers)

    param = torch.nn.Parameter(torch.zeros(2))
    make_optimizer = hydra.utils.instantiate(cfg.stage.optim.optimizer)
    assert isinstance(make_optimizer, functools.partial)
    if "DeepSpeedCPUAdam" not in cfg.stage.optim.optimizer._target_:  # needs DeepSpeed's compiled op
        optimizer = make_optimizer([param])
        scheduler = hydra.utils.instantiate(cfg.stage.optim.scheduler)(optimizer, total_steps=10)
        assert isinstance(optimizer, torch.optim.Optimizer) and hasattr(scheduler, "step")

    module = hydra.utils.instantiate(cfg.stage.module)
    assert isinstance(module, functools.partial) and module.func.stage == cfg.stage.number

    factory = hydra.utils.instantiate(
        cfg.dataset.datamodule, objective=cfg.stage.objective, _convert_="all", _partial_=True
    )
    # as train.py does: the model's spec handed to the partial, never merged into a config (the model
    # config names what builds its backbones, which instantiate would run)
    datamodule = factory(model=ModelSpec.from_config(cfg.model))
    assert datamodule.batch_size == cfg.dataset.batch_size

    strategy = cfg.trainer.get("strategy")
    if isinstance(strategy, DictConfig) and "_target_" in strategy:
        assert hasattr(hydra.utils.instantiate(strategy), "setup")


@pytest.mark.parametrize("task", options("task"))
def test_every_evaluation_task_composes_and_names_a_known_reader(task, tmp_path):
    cfg = compose(
        [f"task={task}", f"paths.root={tmp_path}"], config_name="evaluate", output_dir=str(tmp_path)
    )
    OmegaConf.to_container(cfg, resolve=True)
    assert cfg.task.name == task
    if task != "heldout_loss":
        assert cfg.task.benchmark.reader in READERS and cfg.task.metrics


@pytest.mark.parametrize("option", options("hparams_search"))
def test_every_search_space_names_keys_that_exist(option, tmp_path):
    """The sweeper of an hparams_search option loads, and every key it searches is a key of the
    training config (a typo would search nothing, silently)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    cfg = runnable("hparams_search", option, tmp_path)
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        sweep = hydra_compose("train", overrides=[f"hparams_search={option}"], return_hydra_config=True).hydra
    assert get_object(sweep.sweeper._target_) and sweep.mode.name == "MULTIRUN"
    for key in sweep.sweeper.params:
        assert OmegaConf.select(cfg, key) is not None, f"hparams_search/{option}: {key} is not a config key"


def test_a_callback_option_is_one_callback_and_none_is_none(tmp_path):
    assert list(runnable("callbacks", "stage_bundle", tmp_path).callbacks) == ["stage_bundle"]
    assert not runnable("callbacks", "none", tmp_path).get("callbacks")
    default = runnable("callbacks", "default", tmp_path).callbacks
    assert {"model_checkpoint", "stage_bundle", "data_report"} <= set(default)


def test_the_signature_check_catches_a_key_the_class_does_not_take():
    node = OmegaConf.create(
        {"_target_": "lightning.pytorch.callbacks.LearningRateMonitor", "interval": "step"}
    )
    with pytest.raises(AssertionError, match="interval"):
        check_signature("callbacks.lr_monitor", node)
    check_signature(
        "callbacks.lr_monitor",
        OmegaConf.create(
            {"_target_": "lightning.pytorch.callbacks.LearningRateMonitor", "logging_interval": "step"}
        ),
    )
