"""The denoising loss regresses what the scheduler's prediction_type names, and with it switched
on a stage still changes exactly its trainable tensors (the VAE and UNet stay frozen)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from omegaconf import OmegaConf

from nextgpt.denoising import DenoisingObjective, denoising_target
from nextgpt.spec import run_spec


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_target_follows_prediction_type(kind):
    sched = DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type=kind,
    )
    g = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0, 500, 999])
    target = denoising_target(sched, latents, noise, t)
    if kind == "epsilon":
        assert torch.equal(target, noise)
    else:
        abar = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
        torch.testing.assert_close(target, abar.sqrt() * noise - (1 - abar).sqrt() * latents)
        assert not torch.allclose(target, noise)


def same_draws(obj: DenoisingObjective, media: torch.Tensor, seed: int):
    """The latents, noise, timesteps and alphas-cumprod that ``obj``'s loss draws from a generator
    seeded with ``seed``, drawn again by hand in the same order: (latents, noise, t, abar)."""
    g = torch.Generator().manual_seed(seed)
    latents = obj.latents(media, g)
    noise = torch.randn(latents.shape, generator=g)
    t = torch.randint(0, obj.scheduler.config.num_train_timesteps, (media.shape[0],), generator=g)
    return latents, noise, t, obj.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_loss_regresses_the_scheduler_target(tiny_cache, tmp_path, kind):
    sd = tmp_path / "sd"
    shutil.copytree(tiny_cache / "tiny_backbones" / "sd", sd)
    cfg_path = sd / "scheduler" / "scheduler_config.json"
    sched_cfg = json.loads(cfg_path.read_text())
    sched_cfg["prediction_type"] = kind  # SD 2 is a v-prediction model
    cfg_path.write_text(json.dumps(sched_cfg))
    obj = DenoisingObjective(sd, "last_hidden_state")
    assert obj.scheduler.config.prediction_type == kind
    media = torch.rand(2, 3, 32, 32) * 2 - 1
    cond = torch.randn(2, 77, 32)
    loss = obj.loss(cond, media, torch.Generator().manual_seed(7))
    latents, noise, t, abar = same_draws(obj, media, 7)
    noisy = abar.sqrt() * latents + (1 - abar).sqrt() * noise
    pred = obj.unet(noisy, t, encoder_hidden_states=cond).sample
    target = noise if kind == "epsilon" else abar.sqrt() * noise - (1 - abar).sqrt() * latents
    torch.testing.assert_close(loss, F.mse_loss(pred, target), rtol=1e-4, atol=1e-5)


def test_stage2_with_denoising_changes_only_trainable_tensors(tiny_config):
    from tests.unit.test_stages import build_stage

    cfg = tiny_config("stage=2", "stage.loss.denoise=1.0")
    module = build_stage(cfg)
    assert sorted(module.denoisers) == ["audio", "image", "video"]
    from nextgpt.batch import Collator, ConversationDataset
    from nextgpt.cli.train import denoise_targets

    targets = denoise_targets(run_spec(cfg))
    ds = ConversationDataset(
        [], module.tokenizer, module.model.layout, cfg.dataset.template, 4, 512, denoise_targets=targets
    )
    assert set(targets) == {"image", "audio", "video"}
    from datamodules.nextgpt_layout import (
        read_source,  # two text-to-X samples per modality, with target media
    )

    convs = []
    for src in cfg.dataset.sources:
        convs += read_source(src.name, src.modality, src.root, "generate")[0][:2]
    ds.conversations = convs
    batch = Collator(module.tokenizer.pad_token_id, 4)([ds[i] for i in range(len(ds))])
    assert set(batch["output_media"]) == {"image", "audio", "video"}
    assert batch["output_media"]["image"].shape == (2, 3, 32, 32) and batch["output_media"][
        "video"
    ].shape == (2, 3, 8, 32, 32)
    assert batch["output_media"]["audio"].shape == (2, 4096)  # 0.256 s at the vocoder's 16 kHz

    model = module.model
    frozen_decoders = {
        f"{m}.{n}": p.detach().clone()
        for m, d in module.denoisers.items()
        for n, p in [*d.unet.named_parameters(), *d.vae.named_parameters()]
    }
    before = {n: t.detach().clone() for n, t in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    model.train()
    losses = module.compute_loss(batch)
    assert torch.isfinite(losses["denoise"]) and losses["denoise"] > 0
    losses["loss"].backward()
    opt.step()
    after = model.state_dict()
    assert {n for n in before if not torch.equal(before[n], after[n])} == {
        n for n, p in model.named_parameters() if p.requires_grad
    }
    for m, d in module.denoisers.items():
        for n, p in [*d.unet.named_parameters(), *d.vae.named_parameters()]:
            assert not p.requires_grad and p.grad is None and torch.equal(p, frozen_decoders[f"{m}.{n}"])
    OmegaConf.to_container(cfg)  # the config still serialises


def test_denoise_without_a_target_loader_is_refused_by_the_schema(tiny_config, monkeypatch):
    import dataclasses

    from nextgpt import modality
    from nextgpt.config import ConfigError
    from nextgpt.schema import validate

    validate(
        tiny_config("stage=2", "model.modalities.audio.decoder.denoise=true")
    )  # audio has one (nextgpt.mel)
    monkeypatch.setitem(
        modality._REGISTRY, "audio", dataclasses.replace(modality.get("audio"), target_loader=None)
    )
    with pytest.raises(
        ConfigError, match="model.modalities.audio.decoder.denoise=True: no denoising-loss target loader"
    ):
        validate(tiny_config("stage=2", "model.modalities.audio.decoder.denoise=true"))


def test_audio_denoising_regresses_the_noise_of_its_log_mel_latents(tiny_cache):
    """The AudioLDM loss by hand: waveform -> log-mel -> VAE latents, noised, the UNet reads the CLAP-width
    conditioning as its class embedding; the gradient reaches the conditioning."""
    obj = DenoisingObjective(tiny_cache / "tiny_backbones" / "audioldm", "text_embeds")
    wave = torch.sin(torch.arange(4096) * 0.3)[None].repeat(2, 1) * 0.5
    cond = torch.randn(2, 1, 16, requires_grad=True)
    loss = obj.loss(cond, wave, torch.Generator().manual_seed(3))
    latents, noise, t, abar = same_draws(obj, wave, 3)
    assert latents.shape == (2, 8, 128, 8)
    pred = obj.unet(
        abar.sqrt() * latents + (1 - abar).sqrt() * noise,
        t,
        encoder_hidden_states=None,
        class_labels=cond.squeeze(1),
    ).sample
    torch.testing.assert_close(loss, F.mse_loss(pred, noise), rtol=1e-4, atol=1e-5)
    loss.backward()
    assert cond.grad is not None and cond.grad.abs().sum() > 0
