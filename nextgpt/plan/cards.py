"""Published configurations of the real backbones, for planning where their folders are absent.

A plan reads each backbone's own config file when its folder exists (``config.json`` of the LLM,
``text_encoder/config.json`` and ``unet/config.json`` of a pipeline). For the 7B model configs on a
machine without the weights it falls back to these: the numbers of the public config files of
Vicuna-7B (Llama-7B shapes), the CLIP / CLAP / OpenCLIP text encoders and the UNets and VAEs of
Stable Diffusion 1.5 and 2, AudioLDM and ZeroScope, keyed by the folder name the model configs use.
They are shapes only: no weight is in this file.
"""

from __future__ import annotations

LLAMA_7B = {
    "model_type": "llama",
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
}
LLMS = {
    "vicuna-7b-v0": {**LLAMA_7B, "max_position_embeddings": 2048},
    "vicuna-7b-v1.5": {**LLAMA_7B, "max_position_embeddings": 4096},
}

CLIP_L = {
    "model_type": "clip_text_model",
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "projection_dim": 768,
}
OPENCLIP_H = {
    "model_type": "clip_text_model",
    "vocab_size": 49408,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 23,
    "num_attention_heads": 16,
    "max_position_embeddings": 77,
    "projection_dim": 1024,
    "hidden_act": "gelu",
}
CLAP_TEXT = {
    "model_type": "clap_text_model",
    "vocab_size": 50265,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 514,
    "projection_dim": 512,
    "type_vocab_size": 1,
}
SD_VAE = {
    "_class_name": "AutoencoderKL",
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
SD_BLOCKS = {
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "in_channels": 4,
    "out_channels": 4,
}

# folder name -> (text encoder config, max tokens, UNet config, VAE config); a UNet / VAE of None is
# not planned (its denoising loss is not supported)
PIPELINES = {
    "stable-diffusion-v1-5": (
        CLIP_L,
        77,
        {
            "_class_name": "UNet2DConditionModel",
            **SD_BLOCKS,
            "cross_attention_dim": 768,
            "attention_head_dim": 8,
        },
        SD_VAE,
    ),
    "stable-diffusion-2": (
        OPENCLIP_H,
        77,
        {
            "_class_name": "UNet2DConditionModel",
            **SD_BLOCKS,
            "cross_attention_dim": 1024,
            "attention_head_dim": [5, 10, 20, 20],
            "use_linear_projection": True,
        },
        SD_VAE,
    ),
    "audioldm-l-full": (CLAP_TEXT, 77, None, None),
    "audioldm": (CLAP_TEXT, 77, None, None),
    "zeroscope_v2_576w": (
        OPENCLIP_H,
        77,
        {
            "_class_name": "UNet3DConditionModel",
            "down_block_types": ["CrossAttnDownBlock3D"] * 3 + ["DownBlock3D"],
            "up_block_types": ["UpBlock3D"] + ["CrossAttnUpBlock3D"] * 3,
            "block_out_channels": [320, 640, 1280, 1280],
            "layers_per_block": 2,
            "cross_attention_dim": 1024,
            "attention_head_dim": 64,
            "in_channels": 4,
            "out_channels": 4,
        },
        SD_VAE,
    ),
}
PIPELINES["zeroscope_v2_XL"] = PIPELINES["zeroscope_v2_576w"]

# bf16 dense peak TFLOP/s by device name (a substring of torch.cuda.get_device_name())
PEAK_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "A10": 125.0,
    "4090": 165.0,
    "V100": 125.0,
}
REFERENCE_DEVICE = ("H100", 989.0, 80.0)  # name, bf16 TFLOP/s, GiB: what a plan assumes without a device
