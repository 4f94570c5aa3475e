"""The world decoders' recipes train what their pipelines later run: the same conditioning, the same
latent layout, the same sizes, through save_pretrained / from_pretrained (nextgpt.world.recipes)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nextgpt.model_spec import DecoderSpec
from nextgpt.world.recipes import RECIPES, WORLD_VOCODER, vae_scale

CAPTIONS = ["a loud high pitched beeping tone", "a quiet low pitched steady tone"]


def _pipe(tiny_cache, folder: str):
    from nextgpt.decoders import load_pipeline

    pipe = load_pipeline(tiny_cache / "tiny_backbones" / folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_audio_training_condition_is_what_audioldm_feeds_its_unet(tiny_cache):
    pipe = _pipe(tiny_cache, "audioldm")
    recipe = RECIPES["audio"]
    with torch.no_grad():
        cond = recipe.condition(pipe, CAPTIONS)
        want = pipe._encode_prompt(CAPTIONS, torch.device("cpu"), 1, False)
    assert cond["encoder_hidden_states"] is None
    torch.testing.assert_close(cond["class_labels"], want)
    assert not torch.allclose(cond["class_labels"][0], cond["class_labels"][1])


def test_video_latents_are_laid_out_as_text_to_video_decodes_them(tiny_cache):
    """Frame k of the pipeline's decode of the recipe's latents is the VAE's round trip of frame k."""
    pipe = _pipe(tiny_cache, "t2v")
    recipe = RECIPES["video"]
    recipe.rebuild(pipe)
    x = torch.rand(2, 3, recipe.frames, recipe.size, recipe.size) * 2 - 1
    with torch.no_grad():
        z = recipe.encode(pipe.vae, x)
        assert z.shape == (2, 4, recipe.frames, recipe.size // 4, recipe.size // 4)
        video = pipe.decode_latents(z * pipe.vae.config.scaling_factor)
        for k in (0, 5):
            frame = pipe.vae.decode(pipe.vae.encode(x[:, :, k]).latent_dist.mean).sample
            torch.testing.assert_close(video[:, :, k], frame, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("modality,folder", [("audio", "audioldm"), ("video", "t2v"), ("image", "sd")])
def test_rebuilt_pipelines_save_load_and_generate_at_the_world_sizes(tiny_cache, tmp_path, modality, folder):
    from nextgpt.decoders import load_pipeline, target_spec

    recipe = RECIPES[modality]
    pipe = _pipe(tiny_cache, folder)
    recipe.rebuild(pipe)
    pipe.save_pretrained(tmp_path / folder)
    back = load_pipeline(tmp_path / folder)
    back.set_progress_bar_config(disable=True)
    assert (
        back.scheduler.config.prediction_type == "sample" and type(back.scheduler).__name__ == "DDIMScheduler"
    )
    for a, b in zip(pipe.unet.state_dict().values(), back.unet.state_dict().values(), strict=False):
        assert torch.equal(a, b)
    seen = recipe.generate(back, "a red square moving up", 2, 2.0, torch.Generator().manual_seed(0))
    assert (
        set(seen)
        == {
            "image": {"colour", "shape", "position"},
            "audio": {"pitch", "loudness", "pattern"},
            "video": {"colour", "direction"},
        }[modality]
    )
    if (
        modality == "audio"
    ):  # AudioLDM's own hop; the denoising loss's target is the pipeline's default length
        assert np.prod(back.vocoder.config.upsample_rates) == np.prod(WORLD_VOCODER["upsample_rates"]) == 160
        spec = target_spec(DecoderSpec(str(tmp_path / folder), "text_embeds"))
        assert (
            spec["audio_length_in_s"] == pytest.approx(recipe.seconds(back))
            and spec["sampling_rate"] == 16000
        )
        out = back("a tone", num_inference_steps=2, output_type="np").audios[0]
        assert len(out) == round(recipe.seconds(back) * 16000)
    if modality == "video":
        assert vae_scale(back.vae) == 4 and back.vae_scale_factor == 4


def test_audio_media_is_the_denoising_loss_target_in_log_mel(tiny_cache):
    """The VAE learns the log-mel of exactly the waveform the denoising loss will load for a clip."""
    import json

    from nextgpt import modality
    from nextgpt.world.synthetic import MEDIA_DIRS, dataset_name

    pipe = _pipe(tiny_cache, "audioldm")
    recipe = RECIPES["audio"]
    recipe.rebuild(pipe)
    folder = tiny_cache / "synthetic"
    mel, captions = recipe.media(pipe, folder, 3)
    entry = json.loads((folder / dataset_name("audio") / f"{dataset_name('audio')}.json").read_text())[1]
    wave = modality.get("audio").load_target(
        folder / dataset_name("audio") / MEDIA_DIRS["audio"] / entry["audio_name"],
        {"sampling_rate": 16000, "audio_length_in_s": recipe.seconds(pipe)},
    )
    torch.testing.assert_close(mel[1:2], recipe.front_end(pipe)(wave[None], multiple=vae_scale(pipe.vae)))
    assert captions[1] == entry["caption"] and mel.shape == (3, 1, 64, WORLD_VOCODER["model_in_dim"])
