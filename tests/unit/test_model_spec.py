"""The model spec: every key of configs/model/*.yaml resolved into it, and back out of ``as_dict``."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from nextgpt.config import ConfigError, compose
from nextgpt.model_spec import ModelSpec
from nextgpt.spec import run_spec

MODELS = ["tiny", "world", "nextgpt_7b_legacy", "nextgpt_7b_v15"]


def _missing(raw, spec, where=""):
    """Keys of ``raw`` that ``spec`` (a plain mapping) lost, or whose value it changed."""
    out = []
    for k, v in raw.items():
        if k not in spec:
            out.append(f"{where}{k}")
        elif isinstance(v, dict) and isinstance(spec[k], dict):
            out += _missing(v, spec[k], f"{where}{k}.")
        elif v != spec[k]:
            out.append(f"{where}{k}: {v!r} vs {spec[k]!r}")
    return out


@pytest.mark.parametrize("model", MODELS)
def test_every_key_of_the_model_config_is_kept(model, tmp_path):
    cfg = compose([f"model={model}"], output_dir=str(tmp_path))
    spec = ModelSpec.from_config(cfg.model)
    raw = OmegaConf.to_container(cfg.model, resolve=True)
    raw.pop("backbones", None)  # how the backbones are made (the entry points instantiate it), not the model
    assert "backbones" not in spec.as_dict()
    assert _missing(raw, spec.as_dict()) == []
    assert ModelSpec.from_config(spec.as_dict()) == spec  # a plain dict (a checkpoint's) gives it back
    assert spec.llm.path == str(raw["llm"]["path"]) and "${" not in spec.llm.path  # resolved
    assert set(spec.generated) == {m for m, v in raw["modalities"].items() if v.get("decoder")}


def test_the_run_spec_carries_the_model(tmp_path):
    cfg = compose(["model=tiny", "model.lora.r=4", "model.vocab_rows=all"], output_dir=str(tmp_path))
    spec = run_spec(cfg)
    assert spec.model.lora is not None and spec.model.lora.r == 4 and spec.model.trains_all_rows
    assert spec.sharding is None


def test_unknown_keys_are_kept_and_passed_on(tmp_path):
    cfg = compose(["model=tiny"], output_dir=str(tmp_path))
    raw = OmegaConf.to_container(cfg.model, resolve=True)
    raw["note"] = "kept"
    raw["output_projector"]["bogus"] = 1  # OutputProjector refuses it, as it did before
    spec = ModelSpec.from_config(raw)
    assert spec.as_dict()["note"] == "kept"
    assert spec.output_projector.kwargs()["bogus"] == 1


def test_a_missing_key_is_named(tmp_path):
    raw = OmegaConf.to_container(compose(["model=tiny"], output_dir=str(tmp_path)).model, resolve=True)
    del raw["llm"]["path"]
    with pytest.raises(ConfigError, match=r"model\.llm\.path: missing"):
        ModelSpec.from_config(raw)
    del raw["modalities"]
    with pytest.raises(ConfigError, match=r"model\.modalities: missing"):
        ModelSpec.from_config(raw)
