"""Stage 1 -> 2 -> 3 through `nextgpt.cli.train.train`: each stage starts from the previous bundle,
bundles hold only trainable-group weights, and a missing bundle is a clear error."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from nextgpt.bundles import BundleError, load_bundle_weights
from nextgpt.cli.train import train
from nextgpt.config import ConfigError
from nextgpt.preflight import validate_paths
from nextgpt.schema import validate
from nextgpt.spec import run_spec

pytestmark = pytest.mark.slow

GROUP_PREFIXES = ("input_projector.", "output_projectors.", "new_tokens.markers.", "new_tokens.signals.")


def run_stage(tiny_config, stage: int, *extra: str):
    cfg = tiny_config(
        f"stage={stage}", "trainer.max_steps=3", "stage.batch_size=6", "print_config=false", *extra
    )
    train(cfg)
    return cfg


def test_three_stages_chain_through_bundles(tiny_config, tmp_path):
    bundles = tmp_path / "bundles"
    run_stage(tiny_config, 1)
    s1 = load_file(str(bundles / "stage1" / "trainable.safetensors"))
    # stage 1 keeps what it trained: no backbone weight, no untrained output projector
    assert set(s1) == {
        "input_projector.proj.weight",
        "input_projector.proj.bias",
        "new_tokens.markers.embed",
        "new_tokens.markers.head",
    }

    run_stage(tiny_config, 2)
    s2 = load_file(str(bundles / "stage2" / "trainable.safetensors"))
    # stage 2 carried stage 1's input projector and markers unchanged, and trained its own groups
    for k in s1:
        assert torch.equal(s1[k], s2[k]), k
    assert all(k.startswith(GROUP_PREFIXES) for k in s2)
    assert {"new_tokens.signals.embed", "output_projectors.video.queries"} <= set(s2)

    run_stage(tiny_config, 3)
    s3 = load_file(str(bundles / "stage3" / "trainable.safetensors"))
    lora = [k for k in s3 if ".lora_" in k]
    assert len(lora) == 16 and all(k.startswith("llm.") for k in lora)
    assert not any(k.startswith("llm.") and ".lora_" not in k for k in s3)
    assert not torch.equal(s2["input_projector.proj.weight"], s3["input_projector.proj.weight"])

    meta = json.loads((bundles / "stage3" / "meta.json").read_text())
    assert meta["stage"] == 3 and meta["init_from"].endswith("stage2") and meta["global_step"] == 3
    assert meta["params"] < meta["full_model_params"]
    config_text = (bundles / "stage3" / "config.yaml").read_text()
    assert "${" not in config_text  # resolved config: rebuilds the model on its own


def test_missing_previous_bundle_is_named(tiny_config, tmp_path):
    cfg = tiny_config("stage=2")
    validate(cfg)
    with pytest.raises(ConfigError, match="stage 2 starts from the bundle .*stage1, which does not exist"):
        validate_paths(run_spec(cfg), cfg.init_from)
    cfg = tiny_config("stage=3", f"init_from={tmp_path / 'elsewhere'}")
    with pytest.raises(ConfigError, match="init_from="):
        validate_paths(run_spec(cfg), cfg.init_from)
    cfg = tiny_config("stage=1")
    validate_paths(run_spec(cfg), cfg.init_from)  # stage 1 has nothing to start from: fine


def test_bundle_that_does_not_fit_is_refused(tiny_config, tmp_path):
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    from nextgpt.stages import Stage1EncodingAlignment

    cfg = tiny_config("stage=1")
    module = Stage1EncodingAlignment(
        model=OmegaConf.to_container(cfg.model, resolve=True),
        optim=dict(cfg.stage.optim),
        loss=dict(cfg.stage.loss),
    )
    module.configure_model()
    bad = tmp_path / "bad"
    bad.mkdir()
    save_file(
        {"input_projector.proj.weight": torch.zeros(3, 3), "nonsense.weight": torch.zeros(1)},
        str(bad / "trainable.safetensors"),
    )
    with pytest.raises(BundleError) as err:
        load_bundle_weights(bad, module.model)
    assert "nonsense.weight" in str(err.value) and "input_projector.proj.weight" in str(err.value)
    assert str(bad) in str(err.value)
    (bad / "trainable.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(BundleError, match="could not be read"):
        load_bundle_weights(bad, module.model)


def test_a_run_loads_its_tokenizer_once_for_the_data_and_the_model(tiny_config, monkeypatch):
    """The entry point loads the LLM's tokenizer once and hands it to the datamodule and the stage
    (each loaded its own before); both then use the very same object."""
    import nextgpt.tokens
    from nextgpt.stages import NextGPTStage

    calls: list[str] = []
    real = nextgpt.tokens.AutoTokenizer.from_pretrained
    monkeypatch.setattr(
        nextgpt.tokens.AutoTokenizer,
        "from_pretrained",
        lambda path, *a, **k: calls.append(str(path)) or real(path, *a, **k),
    )
    seen = {}
    configure = NextGPTStage.configure_model

    def spy(self):
        configure(self)
        seen["module"], seen["data"] = self.tokenizer, self.trainer.datamodule.tokenizer

    monkeypatch.setattr(NextGPTStage, "configure_model", spy)
    cfg = run_stage(tiny_config, 1, "trainer.max_steps=1")
    assert calls == [str(cfg.model.llm.path)], calls
    assert seen["module"] is seen["data"]
