"""The decoding-side denoising loss (optional, weighted by stage.loss.denoise).

The target media is encoded to latents by the decoder's own frozen VAE, noised at a random
timestep by the decoder's noise schedule, and the frozen UNet, conditioned on the output
projector's conditioning, must predict what the scheduler's ``prediction_type`` names:
the noise (``epsilon``) or the velocity (``v_prediction``, e.g. SD 2). The current reference
regressed the noise for a v-prediction model; here the target follows the scheduler config.
Gradients flow through the frozen UNet into the output projector only.

Audio (AudioLDM): the target is a waveform, which the decoder's own front end (:mod:`nextgpt.mel`,
read off its vocoder config) turns into the log-mel image its VAE encodes, (B, 1, frames, mels), with
the frame count the pipeline generates for that length.

An SDXL UNet also reads the pooled text embedding and six size/crop ids (``added_cond_kwargs``):
the pooled row is split off our ``sdxl`` conditioning (:func:`nextgpt.decoders.split_pooled`), and the
ids say what the pipeline says at generation for an uncropped image of the training resolution:
original = target = (height, width) of the media, crop = (0, 0).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from nextgpt.decoders import pooled_width, read_model_index, split_pooled, vae_scale_factor
from nextgpt.mel import MelFrontEnd


def denoising_target(
    scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """What the UNet must predict, as its scheduler's ``prediction_type`` says."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if kind == "sample":
        return latents
    raise ValueError(f"scheduler prediction_type {kind!r} is not supported by the denoising loss")


def unet_conditioning(
    conditioning_kind: str, cond: torch.Tensor, size: Sequence[int] | None = None, pooled: int | None = None
) -> dict[str, Any]:
    """A (groups, seq, width) conditioning of ``conditioning_kind`` -> the UNet's conditioning arguments,
    as the pipeline passes them (``size``, ``pooled``: the media's (height, width) and the pooled width, sdxl only)."""
    if conditioning_kind == "text_embeds":
        return {"encoder_hidden_states": None, "class_labels": cond.squeeze(1)}
    if conditioning_kind == "sdxl":
        if size is None or pooled is None:
            raise ValueError("the sdxl conditioning needs the media size and the pooled width")
        embeds, pooled_embeds = split_pooled(cond, pooled)
        h, w = (int(x) for x in size)
        time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=cond.dtype, device=cond.device).expand(
            len(cond), 6
        )
        return {
            "encoder_hidden_states": embeds,
            "added_cond_kwargs": {"text_embeds": pooled_embeds, "time_ids": time_ids},
        }
    return {"encoder_hidden_states": cond}


def to_frames(media: torch.Tensor) -> torch.Tensor:
    """(B, C, F, H, W) videos -> (B * F, C, H, W) frames for a 2D VAE; images and mels pass through."""
    return media.permute(0, 2, 1, 3, 4).flatten(0, 1) if media.ndim == 5 else media


def from_frames(z: torch.Tensor, media: torch.Tensor) -> torch.Tensor:
    """Frame latents back in the layout of ``media``: (B, C, F, h, w) for videos, as text-to-video's latents."""
    return (
        z.view(media.shape[0], media.shape[2], *z.shape[1:]).permute(0, 2, 1, 3, 4) if media.ndim == 5 else z
    )


class DenoisingObjective:
    """A decoder's frozen VAE + UNet + training noise schedule. Not an ``nn.Module`` on purpose:
    nothing here is trained, checkpointed or sharded."""

    def __init__(self, path: str | Path, conditioning: str, dtype: torch.dtype = torch.float32):
        import diffusers  # deferred: diffusers costs ~2 s to import and only the denoising loss needs it

        index = read_model_index(path)
        self.path, self.conditioning = Path(path), conditioning
        self.vae = (
            getattr(diffusers, index["vae"][1]).from_pretrained(path, subfolder="vae", dtype=dtype).eval()
        )
        self.unet = (
            getattr(diffusers, index["unet"][1]).from_pretrained(path, subfolder="unet", dtype=dtype).eval()
        )
        for net in (self.vae, self.unet):
            net.requires_grad_(False)
        # the training schedule: DDPM on the pipeline's betas, keeping its prediction_type
        self.scheduler = diffusers.DDPMScheduler.from_pretrained(path, subfolder="scheduler")
        self.pooled_width = pooled_width(path) if conditioning == "sdxl" else None
        # a pipeline with a vocoder denoises log-mel images of waveforms (AudioLDM)
        self.mel = (
            MelFrontEnd.from_vocoder(self.path / "vocoder")
            if (index.get("vocoder") or [None, None])[1]
            else None
        )
        self.scale = vae_scale_factor(path)

    def to(self, device: torch.device | str) -> DenoisingObjective:
        self.vae.to(device)
        self.unet.to(device)
        return self

    @torch.no_grad()
    def latents(self, media: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Pixels in [-1, 1]: (B, 3, H, W) images or (B, 3, F, H, W) videos, or (B, samples) waveforms
        for a decoder with a vocoder -> scaled VAE latents."""
        if self.mel is not None:
            media = self.mel(media, multiple=self.scale)
        dist = self.vae.encode(to_frames(media).to(self.vae.dtype)).latent_dist
        return from_frames(dist.sample(generator) * self.vae.config.scaling_factor, media)

    def loss(
        self, conditioning: torch.Tensor, media: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """MSE between the UNet's prediction, conditioned on ``conditioning`` (groups, seq, width),
        and the scheduler's target for the noised latents of ``media``: the mean over items."""
        return self.item_losses(conditioning, media, generator).mean()

    def item_losses(
        self, conditioning: torch.Tensor, media: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """(groups,) the MSE of each item, so that a step can normalise over its whole global batch."""
        latents = self.latents(media.to(self.vae.device), generator).float()
        noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        steps = self.scheduler.config.num_train_timesteps
        t = torch.randint(0, steps, (latents.shape[0],), generator=generator, device=latents.device)
        noisy = self.scheduler.add_noise(latents, noise, t)
        pred = self.unet(
            noisy.to(self.unet.dtype), t, **self.unet_kwargs(conditioning, media.shape[-2:])
        ).sample
        target = denoising_target(self.scheduler, latents, noise, t).float()
        return F.mse_loss(pred.float(), target, reduction="none").flatten(1).mean(1)

    def unet_kwargs(self, conditioning: torch.Tensor, size: Sequence[int]) -> dict[str, Any]:
        """Our (groups, seq, width) conditioning -> the UNet's conditioning arguments for media of ``size``."""
        return unet_conditioning(self.conditioning, conditioning.to(self.unet.dtype), size, self.pooled_width)
