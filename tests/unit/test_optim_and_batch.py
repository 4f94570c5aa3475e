"""Optimizer and schedule come from config; the global batch is a key; both fail before anything loads."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch
from omegaconf import OmegaConf

from nextgpt.config import ConfigError, compose
from nextgpt.optim import build_optimizer, build_scheduler
from nextgpt.schema import validate
from nextgpt.spec import BatchPlan, OptimSpec, batch_plan, device_count
from tests.conftest import REPO_ROOT


def optim_cfg(tmp_path, *overrides):
    cfg = compose(list(overrides), output_dir=str(tmp_path))
    validate(cfg)
    return OptimSpec.of(cfg.stage.optim)


def test_default_is_adamw_with_the_stage_numbers_and_warmup_linear_decay(tmp_path):
    optim = optim_cfg(tmp_path, "stage=3")
    params = [torch.nn.Parameter(torch.zeros(3))]
    opt = build_optimizer(optim, params)
    assert type(opt) is torch.optim.AdamW
    group = opt.param_groups[0]
    assert (group["lr"], group["weight_decay"], tuple(group["betas"]), group["eps"]) == (
        5e-4,
        0.001,
        (0.9, 0.999),
        1e-8,
    )
    sched = build_scheduler(optim, opt, total_steps=100)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] < lrs[5] < lrs[9] and max(lrs) == pytest.approx(5e-4, rel=0.02)  # 10% warm-up
    assert lrs[10] > lrs[50] > lrs[99] >= 0 and lrs[99] < 0.02 * 5e-4  # then linear to zero


def test_reference_betas_cosine_schedule_and_another_optimizer_by_override(tmp_path):
    optim = optim_cfg(
        tmp_path,
        "stage.optim.betas=[0.9,0.95]",
        "scheduler=warmup_cosine",
        "stage.optim.optimizer._target_=torch.optim.SGD",
        "~stage.optim.optimizer.betas",
        "~stage.optim.optimizer.eps",
    )
    opt = build_optimizer(optim, [torch.nn.Parameter(torch.zeros(2))])
    assert type(opt) is torch.optim.SGD and opt.param_groups[0]["lr"] == 4e-4
    assert optim_cfg(tmp_path, "stage.optim.betas=[0.9,0.95]").optimizer["betas"] == [0.9, 0.95]
    sched = build_scheduler(optim, opt, total_steps=10)
    assert type(sched).__name__ == "LambdaLR"


def test_the_stage_optimizes_exactly_its_trainable_tensors(tiny_config):
    from tests.unit.test_stages import build_stage

    module = build_stage(tiny_config("stage=3"))
    opt = module.configure_optimizers()["optimizer"]
    in_optimizer = {id(p) for g in opt.param_groups for p in g["params"]}
    trainable = {id(p) for p in module.model.parameters() if p.requires_grad}
    assert in_optimizer == trainable  # frozen backbones hold no optimizer state


@pytest.mark.parametrize(
    "override,key,needle",
    [
        (
            "stage.optim.optimizer._target_=nosuchpackage.Adam",
            "stage.optim.optimizer._target_",
            "not installed",
        ),
        ("stage.optim.optimizer._partial_=false", "stage.optim.optimizer._partial_", "must be true"),
        ("stage.global_batch_size=0", "stage.global_batch_size", ">= 1"),
    ],
)
def test_bad_optimizer_and_batch_values_name_the_key(override, key, needle, tmp_path):
    cfg = compose([override], output_dir=str(tmp_path))
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert any(e.startswith(key) and needle in e for e in err.value.errors), err.value.errors


def test_global_batch_derives_the_accumulation(tmp_path):
    cfg = compose(
        [
            "stage=1",
            "trainer.devices=2",
            "trainer.accelerator=cpu",
            "stage.batch_size=4",
            "stage.global_batch_size=16",
        ],
        output_dir=str(tmp_path),
    )
    OmegaConf.resolve(cfg)
    plan = batch_plan(cfg)
    assert plan == BatchPlan(devices=2, num_nodes=1, per_device=4, accumulate=2)
    assert (
        plan.global_batch == 16 and cfg.trainer.accumulate_grad_batches == 1
    )  # the spec writes nothing back
    assert str(plan) == (
        "world size 2 (2 device(s) x 1 node(s)), per-device batch 4, gradient accumulation 2, global batch 16"
    )
    # the reference: 8 GPUs x 18 on stage 1, no accumulation
    ref = compose(
        ["stage=1", "trainer=gpu", "trainer.devices=8", "stage.global_batch_size=144"],
        output_dir=str(tmp_path),
    )
    OmegaConf.resolve(ref)
    assert batch_plan(ref).accumulate == 1


def test_global_batch_that_does_not_divide_names_the_numbers(tmp_path):
    cfg = compose(
        ["trainer.devices=2", "trainer.num_nodes=3", "stage.batch_size=4", "stage.global_batch_size=100"],
        output_dir=str(tmp_path),
    )
    OmegaConf.resolve(cfg)
    with pytest.raises(
        ConfigError,
        match=r"stage.global_batch_size=100: must be a multiple of devices x nodes x "
        r"dataset.batch_size = 2 x 3 x 4 = 24",
    ):
        batch_plan(cfg)
    both = compose(
        [
            "trainer.devices=2",
            "stage.batch_size=4",
            "stage.global_batch_size=16",
            "trainer.accumulate_grad_batches=4",
        ],
        output_dir=str(tmp_path),
    )
    OmegaConf.resolve(both)
    with pytest.raises(
        ConfigError, match="trainer.accumulate_grad_batches=4: contradicts stage.global_batch_size=16"
    ):
        batch_plan(both)


def test_device_counts_follow_lightning():
    assert device_count(2, "cpu") == 2
    assert device_count([0, 3], "gpu") == 2
    assert device_count("0,1,2", "gpu") == 3 and device_count("3", "gpu") == 3
    assert device_count("auto", "cpu") == 1


@pytest.mark.slow  # a subprocess CLI
def test_train_py_refuses_a_global_batch_that_does_not_divide_within_seconds(tmp_path):
    t0 = time.perf_counter()
    res = subprocess.run(
        [
            sys.executable,
            "train.py",
            "trainer.devices=2",
            "trainer.accelerator=cpu",
            "strategy=ddp",
            "stage.batch_size=4",
            "stage.global_batch_size=12",
            f"paths.root={tmp_path}",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2, res.stderr[-2000:]
    assert (
        "stage.global_batch_size=12: must be a multiple of devices x nodes x dataset.batch_size = 2 x 1 x 4 = 8"
        in res.stderr
    )
    assert "Loading weights" not in res.stderr and not (tmp_path / "bundles").exists()
    assert time.perf_counter() - t0 < 60
