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
from nextgpt.model_spec import ModelSpec
from nextgpt.stages import Stage3InstructionTuning


@pytest.fixture(scope="module")
def bundle(tiny_cache, tmp_path_factory):
    from nextgpt.config import compose

    root = tmp_path_factory.mktemp("gen")
    cfg = compose([f"paths.root={root}", f"paths.cache_dir={tiny_cache}", "stage=3"], output_dir=str(root))
    resolved = OmegaConf.to_container(cfg, resolve=True)
    module = Stage3InstructionTuning(
        model=resolved["model"], optim=resolved["stage"]["optim"], loss=resolved["stage"]["loss"]
    )
    module.configure_model()
    return save_bundle(root / "bundles" / "stage3", module.model, resolved, {"stage": 3})


@pytest.fixture(scope="module")
def generator(bundle):
    return Generator(bundle)


def steer_to(generator: Generator, prompt: str, token_id: int) -> None:
    """Point one new-token head row along the prompt's last hidden state so that ``token_id``
    is the model's first choice: a stand-in for a model trained to answer with that modality."""
    from nextgpt.prompts import Conversation, encode_conversation

    enc = encode_conversation(
        Conversation("p", [(prompt, "")]),
        generator.tokenizer,
        generator.model.layout,
        generator.template,
        num_media_tokens=1,
        max_length=10**6,
        slot_id=0,
    )
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
    gen = generator.decoder(name).generate
    if name == "image":
        img = Image.open(path)
        assert img.size == (gen["width"], gen["height"]) and img.text["prompt"] == prompt
    elif name == "audio":
        wave, rate = sf.read(path)
        pipe = generator.pipeline(name)
        assert rate == pipe.vocoder.config.sampling_rate
        assert abs(len(wave) - gen["audio_length_in_s"] * rate) <= 0.01 * rate and np.isfinite(wave).all()
    else:
        with av.open(str(path)) as c:
            frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
        assert len(frames) == gen["num_frames"] and frames[0].shape == (gen["height"], gen["width"], 3)


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
    assert (
        main(["--bundle", str(bundle), "--prompt", "hello", "--out", str(tmp_path), "--max-new-tokens", "5"])
        == 0
    )
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


class EncodeSpy:
    """Records which modalities (and how many items) reached ImageBind."""

    def __init__(self, model):
        self.model, self.calls = model, []
        self.original = model.encode_media

    def __enter__(self):
        def spy(media, **kwargs):
            self.calls.append({k: tuple(v.shape) for k, v in media.items()})
            return self.original(media, **kwargs)

        self.model.encode_media = spy
        return self

    def __exit__(self, *exc):
        self.model.encode_media = self.original


def synthetic_file(tiny_cache, name: str):
    from nextgpt import modality

    folder = tiny_cache / "synthetic" / f"synthetic_{name}" / modality.get(name).media_folder
    return sorted(folder.iterdir())[0]


@pytest.mark.parametrize("name", ["image", "audio", "video"])
def test_media_to_text(generator, tiny_cache, name, tmp_path):
    path = synthetic_file(tiny_cache, name)
    with EncodeSpy(generator.model) as spy:
        res = generator.chat(f"Describe this {name}.", [path], max_new_tokens=8, out_dir=tmp_path)
    assert len(spy.calls) == 1 and list(spy.calls[0]) == [name] and spy.calls[0][name][0] == 1
    assert isinstance(res.text, str) and res.new_tokens <= 8 and res.timing["llm"] > 0


def test_two_turn_mix_keeps_history(generator, tiny_cache, tmp_path):
    from nextgpt.generate import ChatSession

    session = ChatSession(generator, tmp_path, max_new_tokens=6)
    first = session.ask("What is in it?", [synthetic_file(tiny_cache, "image")])
    assert session.turns[0][0].startswith("<image>") and session.turns[0][1] == first.text
    saved = generator.model.new_tokens.signals.head.detach().clone()
    layout = generator.model.layout
    try:
        prompt = "Now make an audio of it"
        with torch.no_grad():  # steer as in the single-turn tests, on the two-turn context
            from nextgpt.prompts import Conversation, encode_conversation

            conv = Conversation("p", [*session.turns, (prompt, "")], media_in=[("image", session.media[0])])
            enc = encode_conversation(
                conv,
                generator.tokenizer,
                layout,
                generator.template,
                num_media_tokens=generator.num_media_tokens,
                max_length=10**6,
                slot_id=0,
            )
            mask = torch.zeros(1, len(enc.input_ids), dtype=torch.bool)
            for s, _, _ in enc.media_slots:
                mask[0, s : s + generator.num_media_tokens] = True
            from nextgpt import modality

            media = {"image": modality.get("image").load(session.media[0]).unsqueeze(0)}
            h = generator.model(
                torch.tensor([enc.input_ids]), media_mask=mask, media=media, media_sequence=[("image", 0)]
            ).hidden[0, -1]
            table = generator.model.new_tokens
            row = layout.signal_ids["audio"][0] - table.first_new_id - table.markers.head.shape[0]
            table.signals.head[row] = 1e3 * h / h.norm() ** 2
        with EncodeSpy(generator.model) as spy:
            second = session.ask(prompt, max_new_tokens=len(layout.signal_ids["audio"]))
    finally:
        with torch.no_grad():
            generator.model.new_tokens.signals.head.copy_(saved)
    assert spy.calls and "image" in spy.calls[0]  # the first turn's image is still in context
    assert second.signal_groups == ["audio"] and second.files["audio"][0].suffix == ".wav"
    assert len(session.turns) == 2 and "<audio>" in session.turns[1][1]


@pytest.mark.parametrize("case", ["empty", "unsupported", "missing", "corrupt", "overlong"])
def test_bad_requests_are_explained(generator, tmp_path, case):
    from nextgpt.encoders.preprocess import MediaDecodeError
    from nextgpt.generate import GenerationInputError

    prompt, media, error, needle = "Describe it.", [], GenerationInputError, None
    if case == "empty":
        prompt, needle = "   ", "prompt is empty"
    elif case == "unsupported":
        bad = tmp_path / "notes.txt"
        bad.write_text("hello")
        media, needle = [bad], "unsupported media type '.txt'"
    elif case == "missing":
        media, needle = [tmp_path / "gone.png"], "no such media file"
    elif case == "corrupt":
        bad = tmp_path / "broken.png"
        bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
        media, error, needle = [bad], MediaDecodeError, "broken.png"
    else:
        prompt, needle = "word " * 3000, "this model reads at most"
    with pytest.raises(error) as err:
        generator.chat(prompt, media)
    assert needle in str(err.value)


def test_bundle_that_does_not_match_its_config(bundle, tmp_path):
    import shutil

    from nextgpt.bundles import BundleError

    other = tmp_path / "other"
    shutil.copytree(bundle, other)
    cfg = OmegaConf.load(other / "config.yaml")
    cfg.model.input_projector.num_tokens = 2  # as if written for another model
    OmegaConf.save(cfg, other / "config.yaml")
    with pytest.raises(BundleError, match="input_projector.proj.weight"):
        Generator(other)
    with pytest.raises(BundleError, match="not a stage bundle"):
        Generator(tmp_path)


def test_cli_single_turn_with_media_flag(bundle, tiny_cache, tmp_path, capsys):
    image = synthetic_file(tiny_cache, "image")
    assert (
        main(
            [
                "--bundle",
                str(bundle),
                "--prompt",
                "What is this?",
                "--image",
                str(image),
                "--out",
                str(tmp_path),
                "--max-new-tokens",
                "4",
                "--temperature",
                "0.8",
                "--top-p",
                "0.9",
            ]
        )
        == 0
    )
    report = json.loads((tmp_path / "generations.json").read_text())
    assert report[0]["prompt"] == "What is this?" and "signal_groups" in report[0]
    assert main(["--bundle", str(bundle), "--prompt", "x", "--image", str(tmp_path / "none.png")]) == 2
    assert "no such media file" in capsys.readouterr().out


def test_cli_interactive_chat_survives_errors(bundle, tiny_cache, tmp_path, monkeypatch, capsys):
    lines = iter(
        [
            f"/image {synthetic_file(tiny_cache, 'image')}",
            "What is this?",
            "/audio /nowhere.wav",
            "and this?",
            "/reset",
            "hello",
            "/quit",
        ]
    )
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert (
        main(["--bundle", str(bundle), "--interactive", "--out", str(tmp_path), "--max-new-tokens", "3"]) == 0
    )
    out = capsys.readouterr().out
    assert "[0] 'What is this?'" in out and "error: /nowhere.wav: no such media file" in out
    assert "(new conversation)" in out and "[0] 'hello'" in out


def test_decoding_defaults_come_from_the_bundles_model_generation(generator, tiny_cache, tmp_path):
    """``experiment=nextgpt_legacy`` decodes as the original's inference.py (sampled, temperature 0.1,
    200 tokens); a bundle without ``model.generation`` decodes greedily; flags given win."""
    from nextgpt.config import compose

    assert generator.decoding_defaults() == {"max_new_tokens": 64, "temperature": 0.0, "top_p": 1.0}
    cfg = compose(
        [
            "experiment=nextgpt_legacy",
            "model=tiny",
            f"paths.root={tmp_path}",
            f"paths.cache_dir={tiny_cache}",
        ],
        output_dir=str(tmp_path),
    )
    legacy = Generator.from_model(
        generator.model, generator.tokenizer, generator.conditioners, ModelSpec.from_config(cfg.model)
    )
    assert legacy.decoding_defaults() == {"max_new_tokens": 200, "temperature": 0.1, "top_p": 1.0}
    bad = compose(
        [
            "model=tiny",
            "+model.generation.top_p=1.5",
            f"paths.root={tmp_path}",
            f"paths.cache_dir={tiny_cache}",
        ],
        output_dir=str(tmp_path),
    )
    from nextgpt.config import ConfigError
    from nextgpt.schema import validate

    with pytest.raises(ConfigError, match="model.generation.top_p"):
        validate(bad)
