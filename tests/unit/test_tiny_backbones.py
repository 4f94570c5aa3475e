"""The tiny backbones load through the real from_pretrained paths and really generate.

Why: every CPU test of the project runs on these stand-ins for Vicuna / SD 1.5 / AudioLDM / ZeroScope,
so they must be the same classes as the real ones, reload offline, have distinct widths, and run fast.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nextgpt import tiny

CAPTION = "a red circle at the top left"
NEXTGPT_TOKENS = ["<Img>", "</Img>", "[IMG0]", "[AUD0]", "[VID0]"]


@pytest.fixture(scope="module", autouse=True)
def _offline():
    """No hub access: every load below must be satisfied by the local folders alone."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        yield


@pytest.fixture(scope="module")
def built(tiny_cache: Path) -> dict[str, Path]:
    """The session's backbones, built once by ``tiny.build_all`` (the builders under test): the
    tests below read them; :func:`test_builds_are_byte_identical_for_a_seed` builds afresh and
    compares."""
    return tiny.build_all(tiny_cache / "tiny_backbones")


@pytest.fixture(scope="module")
def llm_dir(built: dict[str, Path]) -> Path:
    return built["llm"]


@pytest.fixture(scope="module")
def sd_dir(built: dict[str, Path]) -> Path:
    return built["sd"]


@pytest.fixture(scope="module")
def audioldm_dir(built: dict[str, Path]) -> Path:
    return built["audioldm"]


@pytest.fixture(scope="module")
def t2v_dir(built: dict[str, Path]) -> Path:
    return built["t2v"]


def _load_pipe(path: Path):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(path, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sd(sd_dir: Path):
    return _load_pipe(sd_dir)


@pytest.fixture(scope="module")
def audioldm(audioldm_dir: Path):
    return _load_pipe(audioldm_dir)


@pytest.fixture(scope="module")
def t2v(t2v_dir: Path):
    return _load_pipe(t2v_dir)


def _clip_condition(pipe, texts: list[str]) -> torch.Tensor:
    """SD / T2V conditioning: CLIP last_hidden_state over 77 padded tokens, (B, 77, W)."""
    tok = pipe.tokenizer
    batch = tok(
        texts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt"
    )
    with torch.no_grad():
        return pipe.text_encoder(batch.input_ids).last_hidden_state


def _clap_condition(pipe, texts: list[str]) -> torch.Tensor:
    """AudioLDM conditioning: L2-normalised CLAP text_embeds, (B, projection_dim) -- 2-D, no token axis."""
    tok = pipe.tokenizer
    batch = tok(
        texts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt"
    )
    with torch.no_grad():
        out = pipe.text_encoder(batch.input_ids, attention_mask=batch.attention_mask)
    return F.normalize(out.text_embeds, dim=-1)


# ---------------------------------------------------------------------------------------------- LLM


def test_llm_reloads_with_real_tokenizer(llm_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM, LlamaTokenizer

    tok = AutoTokenizer.from_pretrained(llm_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(llm_dir, local_files_only=True)
    assert isinstance(tok, LlamaTokenizer) and isinstance(model, LlamaForCausalLM)
    assert model.config.vocab_size == len(tok)
    assert 1000 <= len(tok) <= 2000
    assert (model.config.hidden_size, model.config.num_hidden_layers) == (tiny.LLM_HIDDEN, 2)
    assert model.config.max_position_embeddings == 1024
    assert (tok.bos_token, tok.eos_token, tok.unk_token) == ("<s>", "</s>", "<unk>")
    assert tok.pad_token is not None and tok.pad_token_id is not None
    vocab = tok.get_vocab()
    assert not any(t in vocab for t in NEXTGPT_TOKENS), "NExT-GPT tokens are the project's job"

    ids = tok(CAPTION).input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] != tok.eos_token_id
    assert len(ids) <= len(CAPTION.split()) + 1, tok.convert_ids_to_tokens(ids)  # whole words, not bytes
    assert tok.decode(ids, skip_special_tokens=True) == CAPTION
    prompt = "### Human: Generate an image of a blue square.\n### Assistant: Sure thing!\n###"
    assert tok.decode(tok(prompt).input_ids, skip_special_tokens=True) == prompt
    assert tok.unk_token_id not in tok("naïve café ✓").input_ids  # byte fallback, never <unk>

    batch = tok([CAPTION, "a tone"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, batch.input_ids.shape[1], len(tok))
    assert torch.isfinite(logits).all()


# ---------------------------------------------------------------------------------------------- pipelines


def test_pipeline_classes_and_distinct_widths(sd, audioldm, t2v) -> None:
    from diffusers import (
        AudioLDMPipeline,
        AutoencoderKL,
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        PNDMScheduler,
        StableDiffusionPipeline,
        TextToVideoSDPipeline,
        UNet2DConditionModel,
        UNet3DConditionModel,
    )
    from transformers import (
        ClapTextModelWithProjection,
        CLIPTextModel,
        CLIPTokenizer,
        RobertaTokenizer,
        SpeechT5HifiGan,
    )

    assert isinstance(sd, StableDiffusionPipeline)
    assert isinstance(sd.text_encoder, CLIPTextModel) and isinstance(sd.tokenizer, CLIPTokenizer)
    assert isinstance(sd.unet, UNet2DConditionModel) and isinstance(sd.vae, AutoencoderKL)
    assert isinstance(sd.scheduler, PNDMScheduler)

    assert isinstance(audioldm, AudioLDMPipeline)
    assert isinstance(audioldm.text_encoder, ClapTextModelWithProjection)
    assert isinstance(audioldm.tokenizer, RobertaTokenizer)
    assert isinstance(audioldm.unet, UNet2DConditionModel) and isinstance(audioldm.vocoder, SpeechT5HifiGan)
    assert isinstance(audioldm.scheduler, DDIMScheduler)
    assert audioldm.unet.config.class_embed_type == "simple_projection"

    assert isinstance(t2v, TextToVideoSDPipeline)
    assert isinstance(t2v.text_encoder, CLIPTextModel) and isinstance(t2v.tokenizer, CLIPTokenizer)
    assert isinstance(t2v.unet, UNet3DConditionModel)
    assert isinstance(t2v.scheduler, DPMSolverMultistepScheduler)

    sd_w = sd.text_encoder.config.hidden_size
    clap_w = audioldm.text_encoder.config.projection_dim
    t2v_w = t2v.text_encoder.config.hidden_size
    assert (sd_w, clap_w, t2v_w) == (tiny.SD_TEXT_WIDTH, tiny.AUDIOLDM_PROJECTION_DIM, tiny.T2V_TEXT_WIDTH)
    assert len({sd_w, clap_w, t2v_w, tiny.LLM_HIDDEN, audioldm.text_encoder.config.hidden_size}) == 5
    assert sd.unet.config.cross_attention_dim == sd_w
    assert t2v.unet.config.cross_attention_dim == t2v_w
    assert audioldm.unet.config.projection_class_embeddings_input_dim == clap_w
    for pipe in (sd, t2v):
        assert pipe.tokenizer.model_max_length == pipe.text_encoder.config.max_position_embeddings == 77


@pytest.mark.parametrize("name", ["sd", "t2v", "audioldm"])
def test_pipeline_tokenizers_round_trip(name: str, request: pytest.FixtureRequest) -> None:
    pipe = request.getfixturevalue(name)
    tok = pipe.tokenizer
    ids = tok(CAPTION).input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert len(ids) == len(CAPTION.split()) + 2, tok.convert_ids_to_tokens(ids)
    assert tok.decode(ids, skip_special_tokens=True) == CAPTION
    assert len(tok) == pipe.text_encoder.config.vocab_size
    assert pipe.text_encoder.config.eos_token_id == tok.eos_token_id
    assert pipe.text_encoder.config.pad_token_id == tok.pad_token_id


def test_tokenizer_folders_ship_vocab_and_merges(sd_dir: Path, audioldm_dir: Path) -> None:
    for folder in (sd_dir / "tokenizer", audioldm_dir / "tokenizer"):
        assert (folder / "vocab.json").is_file()
        assert (folder / "merges.txt").read_text(encoding="utf-8").startswith("#version: 0.2\n")


def _timed(fn):
    t0 = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - t0


def test_stable_diffusion_generates_from_prompt_embeds(sd) -> None:
    cond, uncond = _clip_condition(sd, [CAPTION]), _clip_condition(sd, [""])
    assert cond.shape == (1, 77, tiny.SD_TEXT_WIDTH)
    images, dt = _timed(
        lambda: (
            sd(
                prompt_embeds=cond,
                negative_prompt_embeds=uncond,
                guidance_scale=7.5,
                num_inference_steps=2,
                generator=torch.Generator().manual_seed(0),
                output_type="np",
            ).images
        )
    )
    assert images.shape == (1, 32, 32, 3)
    assert np.isfinite(images).all() and images.std() > 0
    assert dt < 10.0  # ~0.05-0.5 s when the machine is idle; generous for loaded CI


def test_audioldm_generates_from_prompt_embeds(audioldm) -> None:
    cond, uncond = _clap_condition(audioldm, [CAPTION]), _clap_condition(audioldm, [""])
    assert cond.shape == (1, tiny.AUDIOLDM_PROJECTION_DIM)
    torch.testing.assert_close(cond.norm(dim=-1), torch.ones(1))
    sr = audioldm.vocoder.config.sampling_rate
    for seconds in (0.064, 0.032):
        audio, dt = _timed(
            lambda seconds=seconds: (
                audioldm(
                    prompt_embeds=cond,
                    negative_prompt_embeds=uncond,
                    guidance_scale=7.5,
                    num_inference_steps=2,
                    audio_length_in_s=seconds,
                    generator=torch.Generator().manual_seed(0),
                ).audios
            )
        )
        assert audio.shape == (1, round(seconds * sr))
        assert np.isfinite(audio).all() and np.abs(audio).max() > 1e-3
        assert dt < 10.0  # ~0.05-0.5 s when the machine is idle; generous for loaded CI


def test_text_to_video_generates_from_prompt_embeds(t2v) -> None:
    cond, uncond = _clip_condition(t2v, [CAPTION]), _clip_condition(t2v, [""])
    assert cond.shape == (1, 77, tiny.T2V_TEXT_WIDTH)
    frames, dt = _timed(
        lambda: (
            t2v(
                prompt_embeds=cond,
                negative_prompt_embeds=uncond,
                guidance_scale=7.5,
                num_inference_steps=2,
                num_frames=4,
                height=32,
                width=32,
                generator=torch.Generator().manual_seed(0),
                output_type="np",
            ).frames
        )
    )
    assert frames.shape == (1, 4, 32, 32, 3)
    assert np.isfinite(frames).all() and frames.std() > 0
    assert dt < 10.0  # ~0.05-0.5 s when the machine is idle; generous for loaded CI


# ---------------------------------------------------------------------------------------------- determinism


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.mark.slow  # builds the backbones again
def test_builds_are_byte_identical_for_a_seed(tmp_path: Path, llm_dir: Path, sd_dir: Path) -> None:
    assert _digest(tiny.build_tiny_llm(tmp_path / "llm")) == _digest(llm_dir)
    assert _digest(tiny.build_tiny_stable_diffusion(tmp_path / "sd")) == _digest(sd_dir)


def test_learn_bpe_breaks_ties_deterministically() -> None:
    # equal counts: the smallest pair wins whatever the insertion order; pairs seen once are not merged
    words = {("c", "d"): 2, ("a", "b", "c", "d"): 1, ("a", "b"): 2}
    assert tiny.learn_bpe(words, max_merges=10) == [("a", "b"), ("c", "d")]
    assert tiny.learn_bpe(words, max_merges=10, min_frequency=1) == [("a", "b"), ("c", "d"), ("ab", "cd")]


# ---------------------------------------------------------------------------------------------- build_all


def fast_builders(monkeypatch: pytest.MonkeyPatch) -> None:
    """build_all's own logic (marker, cache, temp folder, rebuild) with each backbone builder
    replaced by one that writes a small file: the real builders are tested above, and the session's
    tiny_cache builds the real set through build_all."""

    def stub(out: Path, *, seed: int = 0) -> Path:
        out.mkdir(parents=True, exist_ok=True)
        (out / "model.safetensors").write_bytes(f"{out.name} {seed} {time.time_ns()}".encode())
        return out

    for name in (
        "build_tiny_llm",
        "build_tiny_stable_diffusion",
        "build_tiny_sd2",
        "build_tiny_sdxl",
        "build_tiny_audioldm",
        "build_tiny_text_to_video",
    ):
        monkeypatch.setattr(tiny, name, stub)


def test_build_all_writes_marker_and_is_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("nextgpt.encoders.imagebind")
    fast_builders(monkeypatch)
    out = tmp_path / "cache"
    paths = tiny.build_all(out)
    assert set(paths) == {"llm", "sd", "sd2", "sdxl", "audioldm", "t2v", "imagebind"}
    marker = (out / ".complete").read_text(encoding="utf-8").splitlines()
    assert marker[0] == tiny.TINY_BUILD_VERSION and marker[1] == f"imagebind {tiny.imagebind_layout_hash()}"
    assert paths["imagebind"] == out / "imagebind" / "imagebind_tiny.pth"
    state = torch.load(paths["imagebind"], map_location="cpu", weights_only=True)
    assert state and all(isinstance(v, torch.Tensor) for v in state.values())
    for key in ("llm", "sd", "sd2", "sdxl", "audioldm", "t2v"):
        assert paths[key].is_dir()
    assert [p.name for p in tmp_path.iterdir()] == ["cache"], "no temp folder left behind"

    weights = paths["llm"] / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    t0 = time.perf_counter()
    assert tiny.build_all(out) == paths
    assert time.perf_counter() - t0 < 1.0
    assert weights.stat().st_mtime_ns == mtime

    # another builder version, or a tiny ImageBind whose layout changed since: rebuilt
    (out / ".complete").write_text("0-stale\n" + "\n".join(marker[1:]) + "\n", encoding="utf-8")
    assert not tiny.is_complete(out)
    monkeypatch.setattr(tiny, "imagebind_layout_hash", lambda: "0123456789ab")
    assert not tiny.is_complete(out)
    tiny.build_all(out)
    assert weights.stat().st_mtime_ns != mtime
    assert (out / ".complete").read_text(encoding="utf-8").splitlines() == [
        tiny.TINY_BUILD_VERSION,
        "imagebind 0123456789ab",
    ]
    assert tiny.is_complete(out)
    assert [p.name for p in tmp_path.iterdir()] == ["cache"], "old cache removed"


def test_interrupted_build_leaves_no_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(out: Path, *, seed: int = 0) -> Path:
        raise KeyboardInterrupt

    fast_builders(monkeypatch)
    monkeypatch.setattr(tiny, "build_tiny_audioldm", boom)  # after the LLM and SD are written
    with pytest.raises(KeyboardInterrupt):
        tiny.build_all(tmp_path / "cache")
    assert list(tmp_path.iterdir()) == []
    assert not tiny.is_complete(tmp_path / "cache")
