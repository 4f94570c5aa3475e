"""Stable Diffusion 2.x and SDXL decoders: our conditioning is the pipeline's own, the denoising loss
regresses what their schedulers and UNets ask for, and the pipelines generate from our tensors.

On the tiny SD 2 (v-prediction, linear-projection UNet, text width 48) and the tiny SDXL (two text
encoders of widths 24 and 32, pooled width 20, a ``text_time`` UNet)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nextgpt import tiny
from nextgpt.decoders import CONDITIONINGS, TextConditioner, join_pooled, load_pipeline
from nextgpt.denoising import DenoisingObjective, denoising_target
from nextgpt.model_spec import COMPONENTS, ModelSpec
from tests.unit.test_denoising import same_draws

CAPTIONS = ["a red circle at the top left", "a blue square"]
POOLED = tiny.SDXL_POOLED_WIDTH
SDXL_WIDTH = sum(tiny.SDXL_TEXT_WIDTHS)


@pytest.fixture(scope="module")
def backbones(tiny_cache):
    return tiny_cache / "tiny_backbones"


@pytest.fixture(scope="module")
def sd2(backbones):
    return load_pipeline(backbones / "sd2"), TextConditioner(backbones / "sd2", "last_hidden_state")


@pytest.fixture(scope="module")
def sdxl(backbones):
    return load_pipeline(backbones / "sdxl"), TextConditioner(backbones / "sdxl", "sdxl")


# --- (a) the conditioning is what the pipeline computes itself ------------------------------------
def test_sd2_conditioning_is_the_pipelines(sd2):
    pipe, cond = sd2
    assert type(pipe).__name__ == "StableDiffusionPipeline" and pipe.unet.config.use_linear_projection
    assert cond.shape == (77, tiny.SD2_TEXT_WIDTH) == (77, pipe.unet.config.cross_attention_dim)
    with torch.no_grad():
        embeds, negative = pipe.encode_prompt(CAPTIONS, "cpu", 1, True)
    torch.testing.assert_close(cond.encode(CAPTIONS), embeds, rtol=0, atol=0)
    torch.testing.assert_close(
        cond.negative().expand_as(negative), negative, rtol=0, atol=0
    )  # the empty prompt


def test_sdxl_conditioning_is_the_pipelines_plus_a_pooled_row(sdxl):
    pipe, cond = sdxl
    assert cond.shape == (77 + 1, SDXL_WIDTH) == (78, pipe.unet.config.cross_attention_dim)
    with torch.no_grad():
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            CAPTIONS, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True
        )
    ours = cond.encode(CAPTIONS)
    assert ours.shape == (2, 78, SDXL_WIDTH) and pooled.shape == (2, POOLED)
    torch.testing.assert_close(ours[:, :-1], embeds, rtol=0, atol=0)
    torch.testing.assert_close(ours[:, -1, :POOLED], pooled, rtol=0, atol=0)
    assert torch.count_nonzero(ours[:, -1, POOLED:]) == 0  # the padding
    # no negative prompt: SDXL base (force_zeros_for_empty_prompt) guides against zeros, so do we
    kwargs = cond.pipeline_kwargs(ours, cond.negative())
    theirs = {
        "prompt_embeds": embeds,
        "negative_prompt_embeds": negative,
        "pooled_prompt_embeds": pooled,
        "negative_pooled_prompt_embeds": negative_pooled,
    }
    assert set(kwargs) == set(theirs)
    for key, value in theirs.items():
        torch.testing.assert_close(kwargs[key], value, rtol=0, atol=0)


def test_sdxl_fingerprint_covers_both_encoders(backbones, tmp_path):
    copy = tmp_path / "sdxl"
    shutil.copytree(backbones / "sdxl", copy)
    before = TextConditioner(copy, "sdxl").fingerprint()
    assert before == TextConditioner(backbones / "sdxl", "sdxl").fingerprint()  # independent of the folder
    config = copy / "text_encoder_2" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "layer_norm_eps": 1e-6}))
    after = TextConditioner(copy, "sdxl").fingerprint()
    assert after != before
    special = copy / "tokenizer_2" / "tokenizer_config.json"
    special.write_text(json.dumps({**json.loads(special.read_text()), "pad_token": "<|endoftext|>"}))
    assert TextConditioner(copy, "sdxl").fingerprint() != after


def test_every_conditioning_kind_the_config_accepts_has_a_reader():
    """The config check, the plan and the path check take the kinds from ``model_spec.COMPONENTS``;
    the encoder reads them with ``decoders.CONDITIONINGS``: one kind with no reader would pass the
    checks and fail at the first batch."""
    assert set(COMPONENTS) == set(CONDITIONINGS)


def test_a_pooled_row_wider_than_the_tokens_is_refused():
    with pytest.raises(ValueError, match="pooled embedding \\(9 wide\\) does not fit .* 8-wide"):
        join_pooled(torch.zeros(1, 77, 8), torch.zeros(1, 9))


def test_a_conditioning_that_does_not_fit_the_folder_is_named(tiny_config, backbones):
    from nextgpt.preflight import backbone_path_errors

    cfg = tiny_config("stage=2", f"model.modalities.image.decoder.path={backbones / 'sdxl'}")
    errors = backbone_path_errors(ModelSpec.from_config(cfg.model))
    key = "model.modalities.image.decoder.conditioning"
    assert any(
        e.startswith(f"{key}='last_hidden_state': a StableDiffusionXLPipeline")
        and "use conditioning: sdxl" in e
        for e in errors
    ), errors
    cfg = tiny_config("stage=2", "model.modalities.image.decoder.conditioning=sdxl")  # on the SD 1.5 folder
    assert any(
        e.startswith(f"{key}='sdxl': the StableDiffusionPipeline folder has no text_encoder_2 / tokenizer_2")
        for e in backbone_path_errors(ModelSpec.from_config(cfg.model))
    )
    cfg = tiny_config(
        "stage=2",
        f"model.modalities.image.decoder.path={backbones / 'sdxl'}",
        "model.modalities.image.decoder.conditioning=sdxl",
    )
    assert not [e for e in backbone_path_errors(ModelSpec.from_config(cfg.model)) if "conditioning" in e]
    with pytest.raises(
        ValueError, match="conditioning 'last_hidden_state' does not fit: a StableDiffusionXLPipeline"
    ):
        TextConditioner(backbones / "sdxl", "last_hidden_state")


# --- (b) the denoising loss -----------------------------------------------------------------------
def test_sd2_regresses_the_velocity_and_sd15_the_noise(backbones):
    media = torch.rand(2, 3, 32, 32) * 2 - 1
    cond = torch.randn(2, 77, tiny.SD2_TEXT_WIDTH)
    obj = DenoisingObjective(backbones / "sd2", "last_hidden_state")
    assert obj.scheduler.config.prediction_type == "v_prediction"
    assert (
        DenoisingObjective(backbones / "sd", "last_hidden_state").scheduler.config.prediction_type
        == "epsilon"
    )
    losses = obj.item_losses(cond, media, torch.Generator().manual_seed(3))
    latents, noise, t, abar = same_draws(obj, media, 3)
    velocity = abar.sqrt() * noise - (1 - abar).sqrt() * latents
    torch.testing.assert_close(denoising_target(obj.scheduler, latents, noise, t), velocity)
    pred = obj.unet(abar.sqrt() * latents + (1 - abar).sqrt() * noise, t, encoder_hidden_states=cond).sample
    by_hand = F.mse_loss(pred, velocity, reduction="none").flatten(1).mean(1)
    torch.testing.assert_close(losses, by_hand, rtol=1e-4, atol=1e-5)


def test_sdxl_unet_reads_the_pooled_row_and_size_ids_and_gives_gradients(backbones, sdxl):
    pipe, conditioner = sdxl
    obj = DenoisingObjective(backbones / "sdxl", "sdxl")
    assert obj.scheduler.config.prediction_type == "epsilon"
    media = torch.rand(2, 3, 32, 32) * 2 - 1
    cond = conditioner.encode(CAPTIONS).requires_grad_(True)
    loss = obj.loss(cond, media, torch.Generator().manual_seed(5))
    # by hand: the pipeline's own size/crop ids for an uncropped 32x32 image
    time_ids = pipe._get_add_time_ids(
        (32, 32), (0, 0), (32, 32), torch.float32, text_encoder_projection_dim=POOLED
    )
    assert time_ids.tolist() == [[32, 32, 0, 0, 32, 32]]
    latents, noise, t, _ = same_draws(obj, media, 5)
    pred = obj.unet(
        obj.scheduler.add_noise(latents, noise, t),
        t,
        encoder_hidden_states=cond[:, :-1],
        added_cond_kwargs={"text_embeds": cond[:, -1, :POOLED], "time_ids": time_ids.repeat(2, 1)},
    ).sample
    torch.testing.assert_close(loss, F.mse_loss(pred, noise), rtol=1e-4, atol=1e-5)
    loss.backward()
    grad = cond.grad
    assert torch.isfinite(grad).all()
    assert (
        grad[:, :-1].abs().sum() > 0 and grad[:, -1, :POOLED].abs().sum() > 0
    )  # the tokens and the pooled row
    assert torch.count_nonzero(grad[:, -1, POOLED:]) == 0  # the padding is read by nothing
    assert all(p.grad is None for p in obj.unet.parameters())


# --- (c) generation from our tensors --------------------------------------------------------------
@pytest.mark.parametrize("name", ["sd2", "sdxl"])
def test_pipeline_generates_from_pipeline_kwargs_as_from_the_prompt(name, request):
    pipe, cond = request.getfixturevalue(name)
    common = {"num_inference_steps": 2, "guidance_scale": 5.0, "height": 32, "width": 32, "output_type": "np"}
    kwargs = cond.pipeline_kwargs(cond.encode(CAPTIONS), cond.negative(), pipe.dtype)
    ours = pipe(**kwargs, generator=[torch.Generator().manual_seed(i) for i in range(2)], **common).images
    assert ours.shape == (2, 32, 32, 3) and np.isfinite(ours).all()
    theirs = pipe(
        prompt=CAPTIONS, generator=[torch.Generator().manual_seed(i) for i in range(2)], **common
    ).images
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_the_other_kinds_keep_their_pipeline_arguments(backbones):
    sd = TextConditioner(backbones / "sd", "last_hidden_state")
    cond = sd.encode(CAPTIONS)
    kwargs = sd.pipeline_kwargs(cond, sd.negative())
    assert set(kwargs) == {"prompt_embeds", "negative_prompt_embeds"}
    assert torch.equal(kwargs["prompt_embeds"], cond)
    assert torch.equal(kwargs["negative_prompt_embeds"], sd.encode(["", ""]))
    clap = TextConditioner(backbones / "audioldm", "text_embeds")
    kwargs = clap.pipeline_kwargs(clap.encode(CAPTIONS), clap.negative(), torch.float64)
    assert (
        kwargs["prompt_embeds"].shape
        == (2, tiny.AUDIOLDM_PROJECTION_DIM)
        == kwargs["negative_prompt_embeds"].shape
    )
    assert kwargs["prompt_embeds"].dtype == torch.float64
