"""Tiny diffusion decoders that know the world: a caption through their own text encoder draws it.

The random tiny pipelines draw noise whatever the caption, so nothing downstream can show that the
output projectors steer them. This trains the same pipelines (the same diffusers classes, saved with
``save_pretrained`` and read back through ``from_pretrained``) on world items:

1. the VAE as an autoencoder of the world's media at the decoder's size (MSE + a small KL term),
   its ``scaling_factor`` then set to 1 / the standard deviation of its latents, as SD's was;
2. the text encoder and the UNet together on the denoising objective of the pipeline's own noise
   schedule and ``prediction_type``, the caption dropped (the empty prompt) for 10 % of the items so
   that classifier-free guidance has an unconditional branch.

Images only so far (Stable Diffusion); text-to-video's UNet3D is next. Quality line: the world
analysers (``nextgpt.world.analysers``) read
the attributes back from media the trained pipeline generates for held-out captions, beside the
random pipeline's and chance.
"""
from __future__ import annotations

import json
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

from nextgpt.world.analysers import image_attributes
from nextgpt.world.attributes import caption_attributes, chance
from nextgpt.world.synthetic import MEDIA_DIRS, dataset_name, write_synthetic

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorldDecoderSettings:
    """How much world a decoder sees and how long it trains (defaults: the build budget on 2 CPU cores)."""

    items: int = 768
    heldout: int = 48  # held-out captions generated for the quality line
    vae_steps: int = 300
    unet_steps: int = 700
    batch: int = 32
    lr: float = 2e-3
    uncond: float = 0.1  # share of captions dropped to the empty prompt (classifier-free guidance)
    inference_steps: int = 20
    guidance_scale: float = 4.0
    seed: int = 0
    train_seed: int = 7
    heldout_seed: int = 1001

    @classmethod
    def small(cls) -> WorldDecoderSettings:
        return cls(items=128, heldout=12, vae_steps=40, unet_steps=60, batch=16, inference_steps=8)




def _fit(img, size: tuple[int, int]):
    from PIL import Image

    return img.convert("RGB").resize(size, Image.BILINEAR)


def _pixels(img) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)


def load_media(folder: Path, limit: int, size: tuple[int, int], single: bool = False) -> tuple[torch.Tensor, list[str]]:
    """The written world images at the decoder's size, in [-1, 1], (N, 3, H, W), and their captions.
    ``single``: only one-shape images (held-out scoring)."""
    from PIL import Image

    name = dataset_name("image")
    entries = json.loads((folder / name / f"{name}.json").read_text())
    if single:
        entries = [e for e in entries if " and a " not in e["caption"]]
    rows, captions = [], []
    for e in entries[:limit]:
        with Image.open(folder / name / MEDIA_DIRS["image"] / e["image_name"]) as im:
            rows.append(_pixels(_fit(im, size)))
        captions.append(e["caption"])
    return torch.stack(rows), captions


def _latents(vae, x: torch.Tensor, sample: bool = True) -> torch.Tensor:
    dist = vae.encode(x).latent_dist
    return dist.sample() if sample else dist.mean


def train_vae(vae, media: torch.Tensor, settings: WorldDecoderSettings, label: str) -> float:
    """Autoencoder training of ``vae`` on ``media``; sets its ``scaling_factor``; returns the final MSE."""
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
        z = torch.cat([vae.encode(media[i : i + 64]).latent_dist.mean for i in range(0, min(len(media), 512), 64)])
    vae.register_to_config(scaling_factor=float(1.0 / z.std()))
    return float(np.mean(losses[-10:]))


def _tokens(tokenizer, captions: Sequence[str]) -> torch.Tensor:
    return tokenizer(list(captions), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def train_denoiser(pipe, media: torch.Tensor, captions: list[str], settings: WorldDecoderSettings, label: str) -> float:
    """Text encoder + UNet on the pipeline's denoising objective; returns the final loss."""
    from diffusers import DDPMScheduler

    from nextgpt.denoising import denoising_target

    schedule = DDPMScheduler.from_config(pipe.scheduler.config)
    rng = np.random.default_rng(settings.seed + 1)
    gen = torch.Generator().manual_seed(settings.seed + 1)
    with torch.no_grad():
        latents = torch.cat([_latents(pipe.vae, media[i : i + 64], sample=False) for i in range(0, len(media), 64)])
        latents = latents * pipe.vae.config.scaling_factor
    params = list(pipe.unet.parameters()) + list(pipe.text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=settings.lr, total_steps=settings.unet_steps, pct_start=0.1)
    pipe.unet.train()
    pipe.text_encoder.train()
    losses = []
    bar = tqdm(range(settings.unet_steps), desc=f"world {label}: UNet", unit="step")
    for _ in bar:
        idx = rng.choice(len(latents), size=min(settings.batch, len(latents)), replace=False)
        z = latents[idx]
        text = ["" if rng.random() < settings.uncond else captions[i] for i in idx]
        noise = torch.randn(z.shape, generator=gen)
        t = torch.randint(0, schedule.config.num_train_timesteps, (len(z),), generator=gen)
        hidden = pipe.text_encoder(_tokens(pipe.tokenizer, text)).last_hidden_state
        pred = pipe.unet(schedule.add_noise(z, noise, t), t, encoder_hidden_states=hidden).sample
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
def generated_accuracy(pipe, modality: str, captions: Sequence[str], settings: WorldDecoderSettings,
                       extra: dict | None = None) -> dict[str, float]:
    """attribute -> the share of ``captions`` whose generated media the analysers read back as captioned."""
    pipe.set_progress_bar_config(disable=True)
    hits: dict[str, list[bool]] = {}
    gen = torch.Generator().manual_seed(settings.seed)
    for caption in captions:
        out = pipe(caption, num_inference_steps=settings.inference_steps, guidance_scale=settings.guidance_scale,
                   generator=gen, output_type="np", **(extra or {}))
        seen, truth = image_attributes(np.asarray(out.images[0]) * 255.0), caption_attributes(caption, modality)
        for attr, value in truth.items():
            hits.setdefault(attr, []).append(seen[attr] == value)
    return {attr: float(np.mean(v)) for attr, v in hits.items()}


def world_unet(pipe) -> None:
    """Give the pipeline a UNet of the same class sized for the world (random, seeded): three levels
    instead of two, so that the 4 x 4 bottom sees the whole 16 x 16 latent (a UNet knows where it is
    only through its borders: with two levels the middle of the image never sees them, and the
    caption's position went unlearned), and a pooled view of the text added to the time embedding
    (``addition_embed_type="text"``) so that every block hears the caption's colour. The pipeline
    still calls it with ``encoder_hidden_states`` only."""
    from diffusers import UNet2DConditionModel

    if not isinstance(pipe.unet, UNet2DConditionModel):
        return
    config = dict(pipe.unet.config)
    config.update(addition_embed_type="text", addition_embed_type_num_heads=4, block_out_channels=(16, 32, 64),
                  down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
    torch.manual_seed(0)
    pipe.register_modules(unet=UNet2DConditionModel.from_config(config).eval())


def with_sample_prediction(pipe) -> None:
    """Make the pipeline predict the clean sample (DDIM, ``prediction_type="sample"``). With the noise
    as the target, the loss at high noise hardly depends on the caption, yet the caption decides the
    layout there: a tiny UNet trained for minutes learns to ignore the text (measured: chance). In
    this world the caption fixes nearly the whole image, so regressing the image itself is the
    fastest way to the right colour in the right place."""
    from diffusers import DDIMScheduler

    config = {k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")}
    config.update(prediction_type="sample", clip_sample=False)
    pipe.register_modules(scheduler=DDIMScheduler.from_config(config))


def train_world_decoder(pipe, modality: str, settings: WorldDecoderSettings = WorldDecoderSettings(),
                        work: Path | None = None) -> dict:
    """Train ``pipe``'s VAE, text encoder and UNet (in place) on world items of ``modality``; returns
    the quality report (generated attributes before and after, chance)."""
    torch.manual_seed(settings.seed)
    start = time.perf_counter()
    size = (int(pipe.unet.config.sample_size) * 2 ** (len(pipe.vae.config.block_out_channels) - 1),) * 2
    extra = {"height": size[0], "width": size[1]}
    if modality != "image":
        raise ValueError(f"world decoders are trained for images only so far, not {modality!r}")
    with tempfile.TemporaryDirectory(prefix=f"world-{modality}-", dir=work) as tmp:
        tmp = Path(tmp)
        write_synthetic(tmp / "train", num_per_modality=settings.items, seed=settings.train_seed)
        write_synthetic(tmp / "heldout", num_per_modality=settings.heldout * 2, seed=settings.heldout_seed)
        media, captions = load_media(tmp / "train", settings.items, size)
        _, heldout = load_media(tmp / "heldout", settings.heldout, size, single=True)
    before = generated_accuracy(pipe, modality, heldout, settings, extra)
    world_unet(pipe)
    with_sample_prediction(pipe)
    vae_mse = train_vae(pipe.vae, media, settings, modality)
    loss = train_denoiser(pipe, media, captions, settings, modality)
    after = generated_accuracy(pipe, modality, heldout, settings, extra)
    report = {"generated_attributes": after, "random_decoder": before, "chance": chance(modality),
              "vae_mse": vae_mse, "final_loss": loss, "heldout_captions": len(heldout),
              "trained_items": len(captions), "seconds": round(time.perf_counter() - start, 1)}
    log.info("world %s decoder: generated attributes of held-out captions %s (random decoder %s, chance %s) in %.0f s",
             modality, {k: round(v, 3) for k, v in after.items()}, {k: round(v, 3) for k, v in before.items()},
             {k: round(v, 3) for k, v in chance(modality).items()}, report["seconds"])
    return report
