"""Tiny diffusion decoders that know the world: a caption through their own text encoder draws it.

The random tiny pipelines draw noise whatever the caption, so nothing downstream can show that the
output projectors steer them. This trains the same pipelines (the same diffusers classes, saved with
``save_pretrained`` and read back through ``from_pretrained``) on world items, with components
sized for the world by the modality's recipe (``nextgpt.world.recipes``):

1. AudioLDM only: its HiFi-GAN vocoder on the world's tones (``recipes.train_vocoder``);
2. the VAE as an autoencoder of the world's media at the decoder's size (MSE + a small KL term),
   its ``scaling_factor`` then set to 1 / the standard deviation of its latents, as SD's was;
3. the text encoder and the UNet together on the denoising objective of the pipeline's own noise
   schedule and ``prediction_type`` (clean-sample prediction), the caption dropped (the empty
   prompt) for 10 % of the items so that classifier-free guidance has an unconditional branch.

Quality line: the world analysers (``nextgpt.world.analysers``) read the attributes back from
media the trained pipeline generates for held-out captions, beside the random pipeline's and chance.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from nextgpt.denoising import denoising_target
from nextgpt.world.attributes import caption_attributes, chance
from nextgpt.world.recipes import RECIPES
from nextgpt.world.synthetic import write_synthetic

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorldDecoderSettings:
    """How much world a decoder sees and how long it trains (defaults: Stable Diffusion's share of the
    build budget on 2 CPU cores)."""

    items: int = 768
    heldout: int = 48  # held-out captions generated for the quality line
    vae_steps: int = 300
    unet_steps: int = 700
    vocoder_steps: int = 0  # AudioLDM's HiFi-GAN
    vocoder_batch: int = 16
    vocoder_lr: float = 3e-3
    batch: int = 32
    lr: float = 2e-3
    uncond: float = 0.1  # share of captions dropped to the empty prompt (classifier-free guidance)
    high_noise: float = (
        0.0  # share of timesteps drawn from the noisier half, where the caption decides the layout
    )
    inference_steps: int = 20
    guidance_scale: float = 4.0
    seed: int = 0
    train_seed: int = 7
    heldout_seed: int = 1001


@dataclass(frozen=True)
class WorldDecodersSettings:
    """One ``WorldDecoderSettings`` per decoder trained on the world."""

    image: WorldDecoderSettings = dataclasses.field(default_factory=WorldDecoderSettings)
    # AudioLDM: loudness is a smaller share of the loss than pitch and is learned late: generated loudness
    # 0.46 after 400 steps, 0.50 after 600, 0.94 after 800 with half the timesteps from the noisier half,
    # where the caption decides (measured)
    audio: WorldDecoderSettings = dataclasses.field(
        default_factory=lambda: WorldDecoderSettings(
            vae_steps=200, unet_steps=800, vocoder_steps=600, guidance_scale=2.5, high_noise=0.5
        )
    )
    video: WorldDecoderSettings = dataclasses.field(
        default_factory=lambda: WorldDecoderSettings(
            items=512, heldout=24, vae_steps=300, unet_steps=400, batch=8, lr=3e-3
        )
    )

    @classmethod
    def small(cls) -> WorldDecodersSettings:
        short = {
            "items": 128,
            "heldout": 12,
            "vae_steps": 40,
            "unet_steps": 60,
            "batch": 16,
            "inference_steps": 8,
        }
        return cls(
            image=WorldDecoderSettings(**short),
            audio=WorldDecoderSettings(**short, vocoder_steps=40, guidance_scale=2.5, high_noise=0.5),
            video=WorldDecoderSettings(**{**short, "items": 32, "unet_steps": 20, "batch": 8}),
        )

    def of(self, modality: str) -> WorldDecoderSettings:
        return getattr(self, modality)


def train_vae(vae, media: torch.Tensor, settings: WorldDecoderSettings, label: str) -> float:
    """Autoencoder training of ``vae`` on ``media`` (a VAE batch).

    Sets its ``scaling_factor``; returns the final MSE."""
    rng = np.random.default_rng(settings.seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=settings.lr, weight_decay=0.0)
    vae.train()
    losses = []
    bar = tqdm(range(settings.vae_steps), desc=f"world {label}: VAE", unit="step")
    for _ in bar:
        x = media[rng.choice(len(media), size=min(settings.batch, len(media)), replace=False)]
        dist = vae.encode(x).latent_dist
        recon = vae.decode(dist.sample()).sample
        mse = F.mse_loss(recon, x)
        loss = mse + 1e-6 * dist.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(mse.item())
        bar.set_postfix(mse=f"{np.mean(losses[-10:]):.4f}")
    vae.eval()
    with torch.no_grad():
        sample = media[
            torch.randperm(len(media), generator=torch.Generator().manual_seed(settings.seed))[:512]
        ]
        z = torch.cat([vae.encode(sample[i : i + 64]).latent_dist.mean for i in range(0, len(sample), 64)])
    vae.register_to_config(scaling_factor=float(1.0 / z.std()))
    return float(np.mean(losses[-10:]))


def train_denoiser(
    pipe, recipe, media: torch.Tensor, captions: list[str], settings: WorldDecoderSettings
) -> float:
    """Text encoder + UNet on the pipeline's denoising objective; returns the final loss."""
    from diffusers import DDPMScheduler  # deferred: diffusers costs ~2 s to import; only training needs it

    schedule = DDPMScheduler.from_config(pipe.scheduler.config)
    rng = np.random.default_rng(settings.seed + 1)
    gen = torch.Generator().manual_seed(settings.seed + 1)
    with torch.no_grad():
        latents = torch.cat([recipe.encode(pipe.vae, media[i : i + 32]) for i in range(0, len(media), 32)])
        latents = latents * pipe.vae.config.scaling_factor
    params = list(pipe.unet.parameters()) + list(pipe.text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=settings.lr, total_steps=settings.unet_steps, pct_start=0.1
    )
    pipe.unet.train()
    pipe.text_encoder.train()
    losses = []
    bar = tqdm(range(settings.unet_steps), desc=f"world {recipe.modality}: UNet", unit="step")
    for _ in bar:
        idx = rng.choice(len(latents), size=min(settings.batch, len(latents)), replace=False)
        z = latents[idx]
        text = ["" if rng.random() < settings.uncond else captions[i] for i in idx]
        noise = torch.randn(z.shape, generator=gen)
        steps = schedule.config.num_train_timesteps
        t = torch.randint(0, steps, (len(z),), generator=gen)
        high = torch.rand(len(z), generator=gen) < settings.high_noise
        t = torch.where(high, steps // 2 + t // 2, t)
        pred = pipe.unet(schedule.add_noise(z, noise, t), t, **recipe.condition(pipe, text)).sample
        loss = F.mse_loss(pred, denoising_target(schedule, z, noise, t))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
    pipe.unet.eval()
    pipe.text_encoder.eval()
    return float(np.mean(losses[-20:]))


@torch.no_grad()
def generated_accuracy(
    pipe, recipe, captions: Sequence[str], settings: WorldDecoderSettings
) -> dict[str, float]:
    """attribute -> the share of ``captions`` whose generated media the analysers read back as captioned."""
    pipe.set_progress_bar_config(disable=True)
    hits: dict[str, list[bool]] = {}
    gen = torch.Generator().manual_seed(settings.seed)
    for caption in captions:
        seen = recipe.generate(pipe, caption, settings.inference_steps, settings.guidance_scale, gen)
        for attr, value in caption_attributes(caption, recipe.modality).items():
            hits.setdefault(attr, []).append(seen[attr] == value)
    return {attr: float(np.mean(v)) for attr, v in hits.items()}


def train_world_decoder(
    pipe, modality: str, settings: WorldDecoderSettings = WorldDecoderSettings(), work: Path | None = None
) -> dict:
    """Rebuild ``pipe``'s components for the world and train them (in place) on world items of
    ``modality``; returns the quality report (generated attributes before and after, chance)."""
    if modality not in RECIPES:
        raise ValueError(f"no world decoder recipe for modality {modality!r}; there are {sorted(RECIPES)}")
    recipe = RECIPES[modality]
    torch.manual_seed(settings.seed)
    start = time.perf_counter()
    report: dict = {}
    with tempfile.TemporaryDirectory(prefix=f"world-{modality}-", dir=work) as tmp:
        train, heldout_dir = Path(tmp) / "train", Path(tmp) / "heldout"
        write_synthetic(
            train, num_per_modality=settings.items, seed=settings.train_seed, modalities=[modality]
        )
        write_synthetic(
            heldout_dir,
            num_per_modality=settings.heldout * 2,
            seed=settings.heldout_seed,
            modalities=[modality],
        )
        heldout = [e["caption"] for e in recipe.entries(heldout_dir, settings.heldout, single=True)]
        before = generated_accuracy(pipe, recipe, heldout, settings)
        recipe.rebuild(pipe)
        report.update(recipe.train_extra(pipe, train, settings))
        media, captions = recipe.media(pipe, train, settings.items)
    report["vae_mse"] = train_vae(pipe.vae, recipe.vae_view(media), settings, modality)
    report["final_loss"] = train_denoiser(pipe, recipe, media, captions, settings)
    after = generated_accuracy(pipe, recipe, heldout, settings)
    report = {
        "generated_attributes": after,
        "random_decoder": before,
        "chance": chance(modality),
        **report,
        "heldout_captions": len(heldout),
        "trained_items": len(captions),
        "seconds": round(time.perf_counter() - start, 1),
    }
    log.info(
        "world %s decoder: generated attributes of held-out captions %s (random decoder %s, chance %s) in %.0f s",
        modality,
        {k: round(v, 3) for k, v in after.items()},
        {k: round(v, 3) for k, v in before.items()},
        {k: round(v, 3) for k, v in chance(modality).items()},
        report["seconds"],
    )
    return report
