"""What differs between the world decoders: one recipe per modality.

The training loops (``nextgpt.world.decoders``) are the same for Stable Diffusion, AudioLDM and
text-to-video; a recipe says, for its pipeline class,

- ``rebuild``: the components sized for the world, of the same diffusers / transformers classes
  (the tiny random ones are sized for fast unit tests, not to learn), and the clean-sample
  prediction that the world's captions need (``with_sample_prediction``);
- ``media``: the world items in the VAE's input space, read through the project's own
  denoising-loss target loaders (``nextgpt.modality``), so the decoder learns exactly what the
  denoising loss later shows it;
- ``vae_view`` / ``encode`` (shared, ``Recipe``): how items become VAE batches and UNet latents
  (video: frame by frame, ``nextgpt.denoising.to_frames``);
- ``condition`` (shared): the UNet's text conditioning of the pipeline's ``conditioning`` kind,
  through the same ``encode_captions`` / ``unet_conditioning`` the denoising loss uses;
- ``generate``: one generation through the pipeline's ``__call__``, read back by the world analysers;
- ``train_extra``: what else the pipeline needs (AudioLDM: its HiFi-GAN vocoder).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TypedDict

import numpy as np
import torch
from tqdm import tqdm

from nextgpt import modality as modalities
from nextgpt.decoders import encode_captions
from nextgpt.denoising import from_frames, to_frames, unet_conditioning
from nextgpt.encoders.preprocess.audio import load_waveform
from nextgpt.mel import MelFrontEnd
from nextgpt.world.analysers import audio_attributes, image_attributes, video_attributes
from nextgpt.world.attributes import caption_attributes
from nextgpt.world.synthetic import MEDIA_DIRS, dataset_name


def with_sample_prediction(pipe) -> None:
    """Make the pipeline predict the clean sample (DDIM, ``prediction_type="sample"``). With the noise
    as the target, the loss at high noise hardly depends on the caption, yet the caption decides the
    layout there: a tiny UNet trained for minutes learns to ignore the text (measured: chance). In
    this world the caption fixes nearly the whole sample, so regressing the sample itself is the
    fastest way to the right colour in the right place."""
    from diffusers import DDIMScheduler  # deferred: diffusers costs ~2 s to import; only training needs it

    config = {k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")}
    config.update(prediction_type="sample", clip_sample=False)
    pipe.register_modules(scheduler=DDIMScheduler.from_config(config))


def vae_scale(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def _path(folder: Path, modality: str, entry: Mapping[str, str]) -> Path:
    name = dataset_name(modality)
    return folder / name / MEDIA_DIRS[modality] / entry[modalities.get(modality).name_field]


class Recipe:
    """What the three recipes share: the world items of a written folder, the VAE's view of media
    (video frame by frame, as ``nextgpt.denoising`` encodes them), and the UNet's text conditioning
    computed by the project's own ``encode_captions`` and ``unet_conditioning`` (the pipeline's way,
    the same code the denoising loss conditions with)."""

    modality: str
    conditioning: str = (
        "last_hidden_state"  # the pipeline's conditioning kind (nextgpt.model_spec.COMPONENTS)
    )

    def entries(self, folder: Path, limit: int, *, single: bool = False) -> list[dict[str, str]]:
        """The first ``limit`` items written under ``folder``; ``single``: images of one shape only
        (their caption names all that is drawn; no caption of another modality joins two things)."""
        name = dataset_name(self.modality)
        entries = json.loads((folder / name / f"{name}.json").read_text())
        return [e for e in entries if not (single and " and a " in e["caption"])][:limit]

    def vae_view(self, x: torch.Tensor) -> torch.Tensor:
        return to_frames(x)

    def encode(self, vae, x: torch.Tensor) -> torch.Tensor:
        """Unscaled VAE means in the layout the pipeline's UNet denoises."""
        return from_frames(vae.encode(to_frames(x)).latent_dist.mean, x)

    def condition(self, pipe, captions: list[str]) -> dict:
        cond = encode_captions(self.conditioning, [pipe.text_encoder], [pipe.tokenizer], captions)
        return unet_conditioning(self.conditioning, cond)

    def train_extra(self, pipe, folder: Path, settings) -> dict:
        return {}


class ImageRecipe(Recipe):
    """Stable Diffusion: a three-level UNet with a pooled text view (``rebuild``), 32 x 32 images."""

    modality = "image"

    def size(self, pipe) -> int:
        return int(pipe.unet.config.sample_size) * vae_scale(pipe.vae)

    def rebuild(self, pipe) -> None:
        """A UNet of the same class sized for the world (random, seeded): three levels instead of two,
        so that the 4 x 4 bottom sees the whole 16 x 16 latent (a UNet knows where it is only through
        its borders: with two levels the middle of the image never sees them, and the caption's
        position went unlearned), and a pooled view of the text added to the time embedding
        (``addition_embed_type="text"``) so that every block hears the caption's colour. The
        pipeline still calls it with ``encoder_hidden_states`` only."""
        from diffusers import (  # deferred: diffusers costs ~2 s to import; only training needs it
            UNet2DConditionModel,
        )

        config = dict(pipe.unet.config)
        config.update(
            addition_embed_type="text",
            addition_embed_type_num_heads=4,
            block_out_channels=(16, 32, 64),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        )
        torch.manual_seed(0)
        pipe.register_modules(unet=UNet2DConditionModel.from_config(config).eval())
        with_sample_prediction(pipe)

    def media(self, pipe, folder: Path, limit: int) -> tuple[torch.Tensor, list[str]]:
        """(N, 3, H, W) in [-1, 1]."""
        entries = self.entries(folder, limit)
        spec = {"width": self.size(pipe), "height": self.size(pipe)}
        image = modalities.get("image")
        return (
            torch.stack([image.load_target(_path(folder, "image", e), spec) for e in entries]),
            [e["caption"] for e in entries],
        )

    def generate(self, pipe, caption: str, steps: int, guidance: float, generator) -> dict:
        size = self.size(pipe)
        out = pipe(
            caption,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=generator,
            height=size,
            width=size,
            output_type="np",
        )
        return image_attributes(np.asarray(out.images[0]) * 255.0)


# AudioLDM's vocoder for the world: a hop of 160 samples at 16 kHz, AudioLDM's own. The hop matters:
# a convolutional vocoder fed a steady tone's identical mel frames emits a signal periodic in the hop,
# so only multiples of 16000 / hop can come out. At 160 (100 Hz) the world's pitches (220, 440 and
# 1,760 Hz, +-0.15 octave) come out as 200, 400 and 1,800 Hz, each nearest its class; at a hop of
# 64 (250 Hz) the middle pitch came out as 250 Hz, read as low (measured).
class VocoderSizes(TypedDict):
    """The SpeechT5HifiGanConfig fields the world's vocoder sets."""

    model_in_dim: int
    sampling_rate: int
    upsample_initial_channel: int
    upsample_rates: list[int]
    upsample_kernel_sizes: list[int]
    resblock_kernel_sizes: list[int]
    resblock_dilation_sizes: list[list[int]]
    normalize_before: bool


WORLD_VOCODER: VocoderSizes = {
    "model_in_dim": 32,
    "sampling_rate": 16000,
    "upsample_initial_channel": 64,
    "upsample_rates": [8, 5, 4],
    "upsample_kernel_sizes": [16, 10, 8],
    "resblock_kernel_sizes": [3, 7],
    "resblock_dilation_sizes": [[1, 3], [1, 3]],
    "normalize_before": False,
}


def _stft_loss(y: torch.Tensor, x: torch.Tensor, floor: float = 1e-2) -> torch.Tensor:
    """Multi-resolution STFT magnitude loss (spectral convergence + log magnitude), phase-free:
    a tone's phase is not in its mel."""
    loss = y.new_zeros(())
    for n in (128, 256, 512, 1024):
        window = torch.hann_window(n)
        ys = torch.stft(y, n, n // 4, window=window, return_complex=True).abs()
        xs = torch.stft(x, n, n // 4, window=window, return_complex=True).abs()
        loss = loss + torch.linalg.norm(ys - xs) / torch.linalg.norm(xs).clamp(min=1e-6)
        loss = loss + (torch.log(ys + floor) - torch.log(xs + floor)).abs().mean()
    return loss


def train_vocoder(vocoder, waves: torch.Tensor, steps: int, batch: int, lr: float, seed: int) -> float:
    """HiFi-GAN generator on (N, samples) waveforms: random 32-frame crops, their log-mel in, the
    multi-resolution STFT loss and a DC penalty out (no discriminator: a tone needs none in the
    budget). Returns the final loss."""
    mel = MelFrontEnd.from_vocoder(vocoder.config.to_dict())
    seg = 32 * mel.hop
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(vocoder.parameters(), lr=lr, betas=(0.8, 0.99))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    vocoder.train()
    losses = []
    bar = tqdm(range(steps), desc="world audio: vocoder", unit="step")
    for _ in bar:
        idx = rng.choice(len(waves), size=min(batch, len(waves)), replace=False)
        offsets = rng.integers(0, waves.shape[1] - seg + 1, len(idx)) // mel.hop * mel.hop
        x = torch.stack([waves[i, o : o + seg] for i, o in zip(idx, offsets, strict=False)])
        y = vocoder(mel(x)[:, 0])
        loss = _stft_loss(y, x) + 1000 * y.mean(-1).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    vocoder.eval()
    return float(np.mean(losses[-20:]))


class AudioRecipe(Recipe):
    """AudioLDM: HiFi-GAN at AudioLDM's hop (``WORLD_VOCODER``), a three-level mel VAE and UNet, 0.64 s;
    CLAP's L2-normalised ``text_embeds`` as the UNet's class labels, no cross-attention."""

    modality = "audio"
    conditioning = "text_embeds"
    vocoder_seconds = 1.0  # of each clip, for the vocoder's crops

    def front_end(self, pipe) -> MelFrontEnd:
        return MelFrontEnd.from_vocoder(pipe.vocoder.config.to_dict())

    def seconds(self, pipe) -> float:
        """The pipeline's default ``audio_length_in_s``."""
        mel = self.front_end(pipe)
        return int(pipe.unet.config.sample_size) * vae_scale(pipe.vae) * mel.hop / mel.sampling_rate

    def rebuild(self, pipe) -> None:
        from diffusers import (  # deferred: diffusers costs ~2 s to import; only training needs it
            AutoencoderKL,
            UNet2DConditionModel,
        )
        from transformers import (  # deferred: transformers costs ~1 s to import; only training needs it
            SpeechT5HifiGan,
            SpeechT5HifiGanConfig,
        )

        torch.manual_seed(0)
        vocoder = SpeechT5HifiGan(SpeechT5HifiGanConfig(**WORLD_VOCODER)).eval()
        torch.manual_seed(0)
        vae = AutoencoderKL(  # type: ignore[attr-defined]  # .eval(): mypy reads diffusers' dummy classes
            in_channels=1,
            out_channels=1,
            latent_channels=8,
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            block_out_channels=(16, 32, 32),
            layers_per_block=1,
            norm_num_groups=8,
            sample_size=64,
        ).eval()
        torch.manual_seed(0)
        # AudioLDM's layout: self-attention only, CLAP as a class embedding
        unet = UNet2DConditionModel(  # type: ignore[attr-defined]  # .eval(): mypy reads diffusers' dummy classes
            sample_size=16,
            in_channels=8,
            out_channels=8,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(32, 64, 64),
            layers_per_block=1,
            norm_num_groups=8,
            cross_attention_dim=(32, 64, 64),
            attention_head_dim=8,
            class_embed_type="simple_projection",
            projection_class_embeddings_input_dim=pipe.text_encoder.config.projection_dim,
            class_embeddings_concat=True,
        ).eval()
        pipe.register_modules(vocoder=vocoder, vae=vae, unet=unet)
        pipe.vae_scale_factor = vae_scale(vae)
        with_sample_prediction(pipe)

    def waves(self, folder: Path, entries: list[dict[str, str]], rate: int, seconds: float) -> torch.Tensor:
        return torch.stack(
            [
                load_waveform(_path(folder, "audio", e), sample_rate=rate, seconds=seconds).clamp(-1, 1)
                for e in entries
            ]
        )

    def media(self, pipe, folder: Path, limit: int) -> tuple[torch.Tensor, list[str]]:
        """(N, 1, frames, mels) log-mel of the first ``seconds(pipe)`` of each clip, the VAE's input."""
        entries = self.entries(folder, limit)
        mel = self.front_end(pipe)
        waves = self.waves(folder, entries, mel.sampling_rate, self.seconds(pipe))
        return mel(waves, multiple=vae_scale(pipe.vae)), [e["caption"] for e in entries]

    def generate(self, pipe, caption: str, steps: int, guidance: float, generator) -> dict:
        out = pipe(
            caption, num_inference_steps=steps, guidance_scale=guidance, generator=generator, output_type="np"
        )
        return audio_attributes(np.asarray(out.audios[0]), int(pipe.vocoder.config.sampling_rate))

    def train_extra(self, pipe, folder: Path, settings) -> dict:
        entries = self.entries(folder, settings.items)
        waves = self.waves(folder, entries, int(pipe.vocoder.config.sampling_rate), self.vocoder_seconds)
        loss = train_vocoder(
            pipe.vocoder,
            waves,
            settings.vocoder_steps,
            settings.vocoder_batch,
            settings.vocoder_lr,
            settings.seed,
        )
        # the vocoder alone, on the true mel of held-in clips: the ceiling of everything behind it
        mel = self.front_end(pipe)
        with torch.no_grad():
            heard = [
                audio_attributes(pipe.vocoder(mel(w[None])[:, 0])[0].numpy(), mel.sampling_rate)
                for w in waves[:64]
            ]
        truth = [caption_attributes(e["caption"], "audio") for e in entries[:64]]
        return {
            "vocoder_loss": loss,
            "vocoder_attributes": {
                k: float(np.mean([h[k] == t[k] for h, t in zip(heard, truth, strict=False)]))
                for k in truth[0]
            },
        }


class VideoRecipe(Recipe):
    """Text-to-video: a three-level frame VAE (8 x 8 latents of 32 x 32 frames) and a UNet3D, 8 frames."""

    modality = "video"
    frames = 8
    size = 32
    vae_levels = 3
    latent_channels = 4
    unet_channels = (16, 32)

    def rebuild(self, pipe) -> None:
        from diffusers import (  # deferred: diffusers costs ~2 s to import; only training needs it
            AutoencoderKL,
            UNet3DConditionModel,
        )

        torch.manual_seed(0)
        vae = AutoencoderKL(  # type: ignore[attr-defined]  # .eval(): mypy reads diffusers' dummy classes
            in_channels=3,
            out_channels=3,
            latent_channels=self.latent_channels,
            down_block_types=("DownEncoderBlock2D",) * self.vae_levels,
            up_block_types=("UpDecoderBlock2D",) * self.vae_levels,
            block_out_channels=(16, 32, 32, 32)[: self.vae_levels],
            layers_per_block=1,
            norm_num_groups=8,
            sample_size=self.size,
        ).eval()
        torch.manual_seed(0)
        unet = UNet3DConditionModel(  # type: ignore[attr-defined]  # .eval(): mypy reads diffusers' dummy classes
            sample_size=self.size // vae_scale(vae),
            in_channels=self.latent_channels,
            out_channels=self.latent_channels,
            down_block_types=("CrossAttnDownBlock3D", "CrossAttnDownBlock3D"),
            up_block_types=("CrossAttnUpBlock3D", "CrossAttnUpBlock3D"),
            block_out_channels=self.unet_channels,
            layers_per_block=1,
            norm_num_groups=8,
            cross_attention_dim=pipe.text_encoder.config.hidden_size,
            attention_head_dim=8,
        ).eval()
        pipe.register_modules(vae=vae, unet=unet)
        pipe.vae_scale_factor = vae_scale(vae)
        with_sample_prediction(pipe)

    def media(self, pipe, folder: Path, limit: int) -> tuple[torch.Tensor, list[str]]:
        """(N, 3, frames, H, W) in [-1, 1]: ``frames`` frames spread over each clip."""
        entries = self.entries(folder, limit)
        spec = {"num_frames": self.frames, "width": self.size, "height": self.size}
        video = modalities.get("video")
        return (
            torch.stack([video.load_target(_path(folder, "video", e), spec) for e in entries]),
            [e["caption"] for e in entries],
        )

    def generate(self, pipe, caption: str, steps: int, guidance: float, generator) -> dict:
        out = pipe(
            caption,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=generator,
            num_frames=self.frames,
            height=self.size,
            width=self.size,
            output_type="np",
        )
        return video_attributes(np.asarray(out.frames[0]) * 255.0)


RECIPES = {r.modality: r for r in (ImageRecipe(), AudioRecipe(), VideoRecipe())}
