"""Each strategy config instantiates the Lightning strategy it names."""
from __future__ import annotations

import hydra
import lightning as L
import pytest
from lightning.pytorch import strategies
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaMLP

from nextgpt.config import compose
from nextgpt.strategies import WrapByClassName

EXPECTED = {
    "auto": (strategies.SingleDeviceStrategy, {}),
    "ddp": (strategies.DDPStrategy, {}),
    "fsdp": (strategies.FSDPStrategy, {}),
    "deepspeed_zero2": (strategies.DeepSpeedStrategy, {"stage": 2, "offload": False}),
    "deepspeed_zero2_offload": (strategies.DeepSpeedStrategy, {"stage": 2, "offload": True}),
    "deepspeed_zero3": (strategies.DeepSpeedStrategy, {"stage": 3, "offload": False}),
}


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


def test_fsdp_wraps_each_decoder_layer():
    policy = WrapByClassName(["DecoderLayer"])
    layer = LlamaDecoderLayer(LlamaConfig(hidden_size=16, intermediate_size=32, num_attention_heads=2,
                                          num_key_value_heads=2), layer_idx=0)
    assert policy(layer, recurse=False, nonwrapped_numel=0)
    assert not policy(layer.mlp, recurse=False, nonwrapped_numel=0) and isinstance(layer.mlp, LlamaMLP)
    assert policy(layer, recurse=True, nonwrapped_numel=0)  # keep descending
