"""Generation from a stage bundle: signal groups -> output projector -> diffusers pipeline -> files."""
from __future__ import annotations

import json

import av
import numpy as np
import pytest
import soundfile as sf
import torch
from omegaconf import OmegaConf
from PIL import Image

from nextgpt.bundles import save_bundle
from nextgpt.generate import Generator, main
from nextgpt.stages import Stage3InstructionTuning


@pytest.fixture(scope="module")
def bundle(tiny_cache, tmp_path_factory):
    from nextgpt.config import compose

    root = tmp_path_factory.mktemp("gen")
    cfg = compose([f"paths.root={root}", f"paths.cache_dir={tiny_cache}", "stage=3"], output_dir=str(root))
    resolved = OmegaConf.to_container(cfg, resolve=True)
    module = Stage3InstructionTuning(model=resolved["model"], optim=resolved["stage"]["optim"], loss=resolved["stage"]["loss"])
    module.configure_model()
    return save_bundle(root / "bundles" / "stage3", module.model, resolved, {"stage": 3})


@pytest.fixture(scope="module")
def generator(bundle):
    return Generator(bundle)


def steer_to(generator: Generator, prompt: str, token_id: int) -> None:
    """Point one new-token head row along the prompt's last hidden state so that ``token_id``
    is the model's first choice: a stand-in for a model trained to answer with that modality."""
    from nextgpt.prompts import Conversation, encode_conversation

    enc = encode_conversation(Conversation("p", [(prompt, "")]), generator.tokenizer, generator.model.layout,
                              generator.template, num_media_tokens=1, max_length=10**6, slot_id=0)
    with torch.no_grad():
        out = generator.model(torch.tensor([enc.input_ids]))
        h = out.hidden[0, -1]
        table = generator.model.new_tokens
        row = token_id - table.first_new_id - table.markers.head.shape[0]
        table.signals.head[row] = 1e3 * h / h.norm() ** 2


@pytest.mark.parametrize("name", ["image", "audio", "video"])
def test_signal_group_generates_a_file(generator, name, tmp_path):
    layout = generator.model.layout
    prompt = f"Please make something: {name}"
    saved = generator.model.new_tokens.signals.head.detach().clone()
    try:
        steer_to(generator, prompt, layout.signal_ids[name][0])
        n = len(layout.signal_ids[name])
        res = generator.chat(prompt, max_new_tokens=n, seed=3, out_dir=tmp_path)
    finally:
        with torch.no_grad():
            generator.model.new_tokens.signals.head.copy_(saved)
    assert f"<{name}>" in res.text and res.repaired_groups == 0
    assert list(res.files) == [name] and len(res.files[name]) == 1
    path = res.files[name][0]
    meta = json.loads(path.with_suffix(path.suffix + ".json").read_text())
    assert meta["prompt"] == prompt and meta["seed"] == 3 and meta["bundle"].endswith("stage3")
    gen = generator.model_cfg.modalities[name].decoder.generate
    if name == "image":
        img = Image.open(path)
        assert img.size == (gen.width, gen.height) and img.text["prompt"] == prompt
    elif name == "audio":
        wave, rate = sf.read(path)
        pipe = generator.pipeline(name)
        assert rate == pipe.vocoder.config.sampling_rate
        assert abs(len(wave) - gen.audio_length_in_s * rate) <= 0.01 * rate and np.isfinite(wave).all()
    else:
        with av.open(str(path)) as c:
            frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
        assert len(frames) == gen.num_frames and frames[0].shape == (gen.height, gen.width, 3)


def test_a_group_started_midway_is_repaired(generator, tmp_path):
    layout = generator.model.layout
    prompt = "Please make a picture"
    saved = generator.model.new_tokens.signals.head.detach().clone()
    try:
        steer_to(generator, prompt, layout.signal_ids["image"][2])  # [IMG2] first: malformed
        res = generator.chat(prompt, max_new_tokens=len(layout.signal_ids["image"]), out_dir=tmp_path)
    finally:
        with torch.no_grad():
            generator.model.new_tokens.signals.head.copy_(saved)
    assert res.repaired_groups == 1 and len(res.files["image"]) == 1


def test_text_only_answer_and_cli(bundle, tmp_path, capsys):
    assert main(["--bundle", str(bundle), "--prompt", "hello", "--out", str(tmp_path), "--max-new-tokens", "5"]) == 0
    report = json.loads((tmp_path / "generations.json").read_text())
    assert report[0]["prompt"] == "hello" and isinstance(report[0]["answer"], str)
    assert "'hello'" in capsys.readouterr().out


def test_kv_cache_matches_full_recompute(generator):
    """Decoding with the KV cache gives the same next-token logits as recomputing the prefix."""
    ids = torch.tensor([generator.tokenizer("### Human: a red circle\n### Assistant:")["input_ids"]])
    full, _, _ = generator._step(generator.model.embed_tokens(ids), None)
    head, _, past = generator._step(generator.model.embed_tokens(ids[:, :-1]), None)
    cached, _, _ = generator._step(generator.model.embed_tokens(ids[:, -1:]), past)
    torch.testing.assert_close(cached, full, rtol=1e-4, atol=1e-4)
