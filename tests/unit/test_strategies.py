"""Each strategy config instantiates the strategy it names; FSDP2's wrap policy finds the LLM's
blocks in the real model; the DeepSpeed configs pass DeepSpeed's own validation with the
optimizer they pick, and offload with a torch optimizer is refused before anything loads."""

from __future__ import annotations

import hydra
import lightning as L
import pytest
from lightning.pytorch import strategies
from omegaconf import OmegaConf

from nextgpt.config import ConfigError, compose
from nextgpt.model_spec import ModelSpec
from nextgpt.schema import validate
from nextgpt.spec import batch_plan, run_spec
from nextgpt.strategies import FSDP2Strategy, WrapByClassName

EXPECTED = {
    "auto": (strategies.SingleDeviceStrategy, {}),
    "ddp": (strategies.DDPStrategy, {}),
    "fsdp": (FSDP2Strategy, {}),
    "deepspeed_zero2": (strategies.DeepSpeedStrategy, {"stage": 2, "offload": False}),
    "deepspeed_zero2_offload": (strategies.DeepSpeedStrategy, {"stage": 2, "offload": True}),
    "deepspeed_zero3": (strategies.DeepSpeedStrategy, {"stage": 3, "offload": False}),
}
DEEPSPEED = sorted(n for n in EXPECTED if n.startswith("deepspeed"))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_strategy_config_instantiates_its_strategy(name, tmp_path):
    if name.startswith("deepspeed"):
        pytest.importorskip("deepspeed", reason="scripts/install.sh installs deepspeed")
    cfg = compose([f"strategy={name}"], output_dir=str(tmp_path))
    node = cfg.trainer.strategy
    strategy = node if isinstance(node, str) else hydra.utils.instantiate(node)
    if isinstance(strategy, str):  # "auto": let a CPU trainer resolve it
        strategy = L.Trainer(strategy=strategy, accelerator="cpu", devices=1, logger=False).strategy
    cls, expect = EXPECTED[name]
    assert isinstance(strategy, cls)
    if "stage" in expect:
        zero = strategy.config["zero_optimization"]
        assert zero["stage"] == expect["stage"]
        assert ("offload_optimizer" in zero) == expect["offload"]
        assert strategy.exclude_frozen_parameters  # checkpoints hold the trainable tensors only
    if name == "ddp":
        assert node.find_unused_parameters is False  # every trainable module runs every step, by design


def test_fsdp_policy_makes_each_llm_block_a_unit(tiny_config):
    """The policy of configs/strategy/fsdp.yaml on the real tiny model: every LLM decoder layer
    is a unit of its own (the rest is sharded with the root)."""
    from nextgpt.model import build_nextgpt

    cfg = tiny_config("strategy=fsdp")
    model, _, _ = build_nextgpt(ModelSpec.from_config(cfg.model))
    units = WrapByClassName(cfg.sharding.wrap).units(model)
    layers = {n for n, m in model.named_modules() if type(m).__name__ == "LlamaDecoderLayer"}
    assert layers and layers <= set(units)
    assert not any(u.startswith(tuple(f"{v}." for v in units)) for u in units)  # outermost matches only
    with pytest.raises(ValueError, match="at least one"):
        WrapByClassName([])


@pytest.mark.parametrize("name", DEEPSPEED)
@pytest.mark.parametrize("model", ["tiny", "nextgpt_7b_legacy"])
def test_deepspeed_configs_pass_deepspeeds_own_validation(name, model, tmp_path):
    pytest.importorskip("deepspeed", reason="scripts/install.sh installs deepspeed")
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    from nextgpt.preflight import deepspeed_preflight

    cfg = compose(
        [
            f"strategy={name}",
            f"model={model}",
            "trainer=gpu",
            "trainer.devices=8",
            "stage.global_batch_size=144",
        ],
        output_dir=str(tmp_path),
    )
    validate(cfg)
    OmegaConf.resolve(cfg)
    plan = batch_plan(cfg)
    assert (plan.world_size, plan.per_device, plan.accumulate, plan.global_batch) == (8, 18, 1, 144)
    config = deepspeed_preflight(
        hydra.utils.instantiate(cfg.trainer.strategy), str(cfg.trainer.precision), run_spec(cfg)
    )
    assert config["bf16"] == {"enabled": True} and config["train_micro_batch_size_per_gpu"] == 18
    picked = hydra.utils.get_class(cfg.stage.optim.optimizer._target_)
    assert issubclass(picked, DeepSpeedCPUAdam) == name.endswith("offload")


def test_offload_with_a_torch_optimizer_is_refused_before_anything_loads(tmp_path):
    pytest.importorskip("deepspeed", reason="scripts/install.sh installs deepspeed")
    from nextgpt.preflight import deepspeed_preflight

    cfg = compose(["strategy=deepspeed_zero2_offload", "optimizer=adamw"], output_dir=str(tmp_path))
    with pytest.raises(
        ConfigError, match="stage.optim.optimizer._target_='torch.optim.AdamW'.*deepspeed_cpu_adam"
    ):
        validate(cfg)
    OmegaConf.resolve(cfg)
    # and DeepSpeed's own rule says the same, should the schema ever miss it
    with pytest.raises(ConfigError, match="DeepSpeed refuses it"):
        deepspeed_preflight(
            hydra.utils.instantiate(cfg.trainer.strategy), str(cfg.trainer.precision), run_spec(cfg)
        )
