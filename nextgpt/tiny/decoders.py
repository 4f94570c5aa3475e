"""The tiny diffusion pipelines: Stable Diffusion 1.5, 2.x and XL, AudioLDM and text-to-video, the
real diffusers classes with random weights and trained tokenizers, saved with ``save_pretrained``.
Every conditioning width differs from the others and from the LLM's."""

from __future__ import annotations

from pathlib import Path

import torch

from nextgpt.tiny.tokenizers import (
    CLAP_MAX_LENGTH,
    CLIP_MAX_LENGTH,
    build_clip_tokenizer,
    build_roberta_tokenizer,
    clip_vocab,
    roberta_vocab,
    write_vocab_merges,
)

SD_TEXT_WIDTH = 32
AUDIOLDM_TEXT_HIDDEN = 24  # CLAP text transformer width; the conditioning width is the projection below
AUDIOLDM_PROJECTION_DIM = 16  # = AudioLDM conditioning width (text_embeds), like 512 for the real one
T2V_TEXT_WIDTH = 40
SD2_TEXT_WIDTH = 48  # OpenCLIP-H stand-in (1024 in SD 2.x)
SDXL_TEXT_WIDTHS = (24, 32)  # CLIP-L and OpenCLIP-bigG stand-ins (768, 1280): the conditioning is 56 wide
SDXL_POOLED_WIDTH = 20  # text_encoder_2's projection_dim (1280 in SDXL), unlike its hidden width on purpose
SDXL_TIME_EMBED_DIM = 8  # addition_time_embed_dim (256 in SDXL)


def _clip_text_encoder(
    tokenizer,
    width: int,
    seed: int,
    *,
    hidden_act: str = "quick_gelu",
    projection_dim: int | None = None,
    with_projection: bool = False,
):
    """CLIPTextModel (or CLIPTextModelWithProjection, whose ``text_embeds`` SDXL pools) of ``width``."""
    from transformers import (  # deferred: transformers costs ~1 s to import; only a build needs it
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
    )

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=2 * width,
        projection_dim=projection_dim or width,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=CLIP_MAX_LENGTH,
        hidden_act=hidden_act,
        layer_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config).eval()


def _openclip_tokenizer(seed: int):
    """The CLIP tokenizer as SD 2.x / SDXL's OpenCLIP encoders ship it: padded with ``!``."""
    tokenizer = build_clip_tokenizer(seed)
    tokenizer.pad_token = "!"
    return tokenizer


def _image_vae(seed: int, scaling_factor: float = 0.18215):
    from diffusers import AutoencoderKL  # deferred: diffusers costs ~2 s to import; only a build needs it

    torch.manual_seed(seed)
    return AutoencoderKL(  # type: ignore[attr-defined]  # .eval(): mypy reads diffusers' dummy classes
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=32,
        scaling_factor=scaling_factor,
    ).eval()


def _unet(cls, blocks: str, width: int, head_dim: int | tuple[int, ...], seed: int, **extra):
    """A two-level UNet (2D for images, 3D for video) cross-attending to ``width``-wide text;
    ``extra``: the family's own settings (SD 2's linear projections, say)."""

    torch.manual_seed(seed)
    return cls(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=(f"CrossAttnDownBlock{blocks}", f"DownBlock{blocks}"),
        up_block_types=(f"UpBlock{blocks}", f"CrossAttnUpBlock{blocks}"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=width,
        attention_head_dim=head_dim,
        **extra,
    ).eval()


def build_tiny_stable_diffusion(out: Path, *, seed: int = 0) -> Path:
    """Tiny StableDiffusionPipeline (CLIP text width 32, 77 positions, PNDM like SD 1.5, 32x32 images)."""
    from diffusers import (  # deferred: diffusers costs ~2 s to import; only a build needs it
        PNDMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )

    out = Path(out)
    tokenizer = build_clip_tokenizer(seed)
    text_encoder = _clip_text_encoder(tokenizer, SD_TEXT_WIDTH, seed)
    unet = _unet(UNet2DConditionModel, "2D", SD_TEXT_WIDTH, 4, seed)
    vae = _image_vae(seed)
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        set_alpha_to_one=False,
        skip_prk_steps=True,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out)  # type: ignore[attr-defined]  # mypy reads diffusers' dummy classes
    _add_vocab_files(out / "tokenizer", seed, clip=True)
    return out


def build_tiny_sd2(out: Path, *, seed: int = 0) -> Path:
    """Tiny Stable Diffusion 2.x: v-prediction DDIM like stable-diffusion-2-1, a linear-projection UNet
    with per-block head dims, an OpenCLIP-style text encoder (GELU, ``!`` padding) of width 48, 32x32 images.
    Its conditioning is ``last_hidden_state``: diffusers' SD 2 text encoder already ends at OpenCLIP's
    penultimate layer."""
    from diffusers import (  # deferred: diffusers costs ~2 s to import; only a build needs it
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )

    out = Path(out)
    tokenizer = _openclip_tokenizer(seed)
    text_encoder = _clip_text_encoder(tokenizer, SD2_TEXT_WIDTH, seed, hidden_act="gelu")
    unet = _unet(
        UNet2DConditionModel,
        "2D",
        SD2_TEXT_WIDTH,
        (2, 4),
        seed,
        use_linear_projection=True,
        upcast_attention=True,
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="v_prediction",
    )
    pipe = StableDiffusionPipeline(
        vae=_image_vae(seed),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out)  # type: ignore[attr-defined]  # mypy reads diffusers' dummy classes
    _add_vocab_files(out / "tokenizer", seed, clip=True)
    return out


def build_tiny_sdxl(out: Path, *, seed: int = 0) -> Path:
    """Tiny StableDiffusionXLPipeline: CLIP (24) + OpenCLIP-with-projection (32, pooled 20) text encoders,
    a ``text_time`` UNet cross-attending to their concatenation (56), Euler like SDXL base, 32x32 images.

    UNet arithmetic as in SDXL: the added embedding reads the pooled text (20) and six size/crop ids
    of ``addition_time_embed_dim`` 8 each: projection_class_embeddings_input_dim = 20 + 6 * 8 = 68.
    """
    from diffusers import (  # deferred: diffusers costs ~2 s to import; only a build needs it
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )

    out = Path(out)
    width_1, width_2 = SDXL_TEXT_WIDTHS
    tokenizer, tokenizer_2 = build_clip_tokenizer(seed), _openclip_tokenizer(seed)
    text_encoder = _clip_text_encoder(tokenizer, width_1, seed)
    text_encoder_2 = _clip_text_encoder(
        tokenizer_2,
        width_2,
        seed + 1,
        hidden_act="gelu",
        projection_dim=SDXL_POOLED_WIDTH,
        with_projection=True,
    )
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(  # type: ignore[attr-defined]  # .eval(): mypy reads diffusers' dummy classes
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        transformer_layers_per_block=(1, 2),
        cross_attention_dim=width_1 + width_2,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=SDXL_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=SDXL_POOLED_WIDTH + 6 * SDXL_TIME_EMBED_DIM,
    ).eval()
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
    )
    pipe = StableDiffusionXLPipeline(
        vae=_image_vae(seed, scaling_factor=0.13025),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,  # as SDXL base: no negative prompt = zero conditioning
    )
    pipe.save_pretrained(out)  # type: ignore[attr-defined]  # mypy reads diffusers' dummy classes
    for sub in ("tokenizer", "tokenizer_2"):
        _add_vocab_files(out / sub, seed, clip=True)
    return out


def build_tiny_audioldm(out: Path, *, seed: int = 0) -> Path:
    """Tiny AudioLDMPipeline: CLAP text (projection_dim 16 = conditioning width), DDIM like l-full.

    Output-length arithmetic (as in AudioLDMPipeline): one mel frame = prod(upsample_rates)/sampling_rate
    = 16/16000 s; the VAE halves the mel grid (vae_scale_factor 2) and the mel has 16 bins = vocoder
    model_in_dim; unet sample_size 32 gives a default of 32*2 frames = 0.064 s = 1024 samples.
    """
    from diffusers import (  # deferred: diffusers costs ~2 s to import; only a build needs it
        AudioLDMPipeline,
        AutoencoderKL,
        DDIMScheduler,
        UNet2DConditionModel,
    )
    from transformers import (  # deferred: transformers costs ~1 s to import; only a build needs it
        ClapTextConfig,
        ClapTextModelWithProjection,
        SpeechT5HifiGan,
        SpeechT5HifiGanConfig,
    )

    out = Path(out)
    tokenizer = build_roberta_tokenizer(seed)
    text_config = ClapTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=AUDIOLDM_TEXT_HIDDEN,
        intermediate_size=2 * AUDIOLDM_TEXT_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=CLAP_MAX_LENGTH + 3,  # RoBERTa positions start at pad_token_id + 1
        projection_dim=AUDIOLDM_PROJECTION_DIM,
        layer_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    text_encoder = ClapTextModelWithProjection(text_config).eval()
    mel_bins = 16
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(  # type: ignore[attr-defined]  # .eval(): mypy reads diffusers' dummy classes
        sample_size=32,
        in_channels=8,
        out_channels=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        # AudioLDM has no text cross-attention: its attention blocks self-attend (cross dim = block width)
        # and the CLAP embedding enters as a class embedding concatenated to the time embedding.
        cross_attention_dim=(16, 32),
        attention_head_dim=4,
        class_embed_type="simple_projection",
        projection_class_embeddings_input_dim=AUDIOLDM_PROJECTION_DIM,
        class_embeddings_concat=True,
    ).eval()
    torch.manual_seed(seed)
    vae = AutoencoderKL(  # type: ignore[attr-defined]  # .eval(): mypy reads diffusers' dummy classes
        in_channels=1,
        out_channels=1,
        latent_channels=8,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=64,
    ).eval()
    torch.manual_seed(seed)
    vocoder = SpeechT5HifiGan(
        SpeechT5HifiGanConfig(
            model_in_dim=mel_bins,
            sampling_rate=16000,
            upsample_initial_channel=16,
            upsample_rates=[4, 4],
            upsample_kernel_sizes=[8, 8],
            resblock_kernel_sizes=[3],
            resblock_dilation_sizes=[[1, 3]],
            normalize_before=False,
            initializer_range=0.1,  # 0.1: waveform amplitude ~0.1 instead of ~1e-5
        )
    ).eval()
    scheduler = DDIMScheduler(
        beta_start=0.0015,
        beta_end=0.0195,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = AudioLDMPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        vocoder=vocoder,
    )
    pipe.save_pretrained(out)  # type: ignore[attr-defined]  # mypy reads diffusers' dummy classes
    _add_vocab_files(out / "tokenizer", seed, clip=False)
    return out


def build_tiny_text_to_video(out: Path, *, seed: int = 0) -> Path:
    """Tiny TextToVideoSDPipeline (UNet3D, CLIP text width 40, 77 positions, DPM-Solver++ like ZeroScope)."""
    from diffusers import (  # deferred: diffusers costs ~2 s to import; only a build needs it
        DPMSolverMultistepScheduler,
        TextToVideoSDPipeline,
        UNet3DConditionModel,
    )

    out = Path(out)
    tokenizer = build_clip_tokenizer(seed)
    text_encoder = _clip_text_encoder(tokenizer, T2V_TEXT_WIDTH, seed)
    unet = _unet(UNet3DConditionModel, "3D", T2V_TEXT_WIDTH, 8, seed)
    vae = _image_vae(seed)
    scheduler = DPMSolverMultistepScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
    )
    pipe = TextToVideoSDPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler
    )
    pipe.save_pretrained(out)  # type: ignore[attr-defined]  # mypy reads diffusers' dummy classes
    _add_vocab_files(out / "tokenizer", seed, clip=True)
    return out


def _add_vocab_files(folder: Path, seed: int, *, clip: bool) -> None:
    """Write vocab.json/merges.txt beside tokenizer.json when save_pretrained did not (transformers 5)."""
    if (folder / "vocab.json").exists() and (folder / "merges.txt").exists():
        return
    vocab, merges = clip_vocab(seed) if clip else roberta_vocab(seed)
    write_vocab_merges(folder, vocab, list(merges))
