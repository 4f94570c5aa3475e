"""Random feature networks of the metrics, saved the way the real ones are distributed, so that
tests (and a dry run of an evaluation) load them through the same paths as the real weights:
a tiny CLIP and a tiny CLAP as Hugging Face folders, and full-size InceptionV3 / VGGish state dicts
with the names of pytorch-fid's and the VGGish port's files. Their scores mean nothing."""

from __future__ import annotations

from pathlib import Path

import torch

from nextgpt.metrics.inception import FIDInceptionV3
from nextgpt.metrics.vggish import VGGish
from nextgpt.tiny.tokenizers import build_clip_tokenizer, build_roberta_tokenizer


def build_tiny_clip(out: str | Path, seed: int = 0) -> Path:
    from transformers import (  # deferred: CLIP's classes cost ~2 s; Inception/VGGish need none
        CLIPConfig,
        CLIPModel,
    )

    out = Path(out)
    tok = build_clip_tokenizer(seed)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )
    torch.manual_seed(seed)
    CLIPModel(config).eval().save_pretrained(out)
    tok.save_pretrained(out)
    return out


def build_tiny_clap(out: str | Path, seed: int = 0) -> Path:
    """CLAP with a 2 s, 48 kHz, 16-mel front end and a two-stage HTSAT of width 16."""
    from transformers import (  # deferred: CLAP's classes cost ~2 s; Inception/VGGish need none
        ClapConfig,
        ClapFeatureExtractor,
        ClapModel,
    )

    out = Path(out)
    tok = build_roberta_tokenizer(seed)
    config = ClapConfig(
        text_config=dict(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=tok.model_max_length + 3,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        ),
        audio_config=dict(
            spec_size=64,
            num_mel_bins=16,
            patch_size=4,
            patch_stride=(4, 4),
            hidden_size=16,
            patch_embeds_hidden_size=8,
            depths=[1, 1],
            num_attention_heads=[2, 2],
            window_size=4,
            enable_fusion=False,
        ),
        projection_dim=16,
    )
    torch.manual_seed(seed)
    ClapModel(config).eval().save_pretrained(out)
    tok.save_pretrained(out)
    ClapFeatureExtractor(
        feature_size=16, sampling_rate=48000, max_length_s=2, fft_window_size=1024, hop_length=480
    ).save_pretrained(out)
    return out


def _random_bn_stats(model: torch.nn.Module, seed: int) -> None:
    """He-initialised convolutions and near-identity BatchNorm statistics, so that activations keep
    their scale through all 94 layers (PyTorch's default init shrinks them to nothing)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu", generator=g)
        if isinstance(m, torch.nn.BatchNorm2d) and m.running_mean is not None and m.running_var is not None:
            m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
            m.running_var.copy_(1 + 0.1 * torch.rand(m.running_var.shape, generator=g))


def build_random_inception(path: str | Path, seed: int = 0) -> Path:
    """A random FID InceptionV3 state dict, without BatchNorm step counters like the 2015 port."""
    torch.manual_seed(seed)
    model = FIDInceptionV3().eval()
    _random_bn_stats(model, seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}, path)
    return path


def build_random_vggish(path: str | Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(VGGish().state_dict(), path)
    return path
