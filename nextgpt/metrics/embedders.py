"""CLIP and CLAP through transformers, from local Hugging Face folders, and the scores built on them.

CLIP score (and CLIPSIM, its per-frame mean for video) is ``100 * max(cos(text, image), 0)``, the
convention of the text-to-image and text-to-video papers (CLIPSIM 31.97 in NExT-GPT's table);
CLAP score is the same for text and audio.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from nextgpt.encoders.preprocess.resampling import resample
from nextgpt.metrics import Unavailable
from nextgpt.metrics.media import square_crop, to_tensor

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_score(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise ``100 * max(cos(a_i, b_i), 0)``: symmetric in its arguments and within [0, 100]."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-12)
    return 100.0 * np.clip(cos, 0.0, 1.0)


def _features(out) -> torch.Tensor:
    """transformers 5 returns model outputs whose pooler_output holds the projected features."""
    return out.pooler_output if hasattr(out, "pooler_output") else out


@torch.no_grad()
def text_features(embedder, texts: Sequence[str], max_length: int | None = None) -> np.ndarray:
    """L2-normalised text embeddings of a CLIP or CLAP embedder (``model``, ``tokenizer``, ``batch_size``)."""
    out = []
    for i in range(0, len(texts), embedder.batch_size):
        tok = embedder.tokenizer(
            list(texts[i : i + embedder.batch_size]),
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        ).to(embedder.device)
        feats = embedder.model.get_text_features(
            input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]
        )
        out.append(F.normalize(_features(feats), dim=-1).cpu())
    return torch.cat(out).numpy()


def _check_folder(path: str | Path | None, what: str, key: str) -> Path:
    if not path or not (Path(path) / "config.json").is_file():
        raise Unavailable(
            f"{what} weights not found at {path} (a Hugging Face folder with config.json; "
            f"set feature_nets.{key}=PATH)"
        )
    return Path(path)


class ClipEmbedder:
    """CLIPModel + its tokenizer; images are resized and centre-cropped to the model's input size."""

    def __init__(self, path: str | Path | None, device: str | torch.device = "cpu", batch_size: int = 32):
        from transformers import (  # deferred: CLIP's classes cost ~2 s; only an embedder needs them
            AutoTokenizer,
            CLIPModel,
        )

        self.path = _check_folder(path, "CLIP", "clip")
        model = CLIPModel.from_pretrained(str(self.path))
        self.model = model.to(device).eval().requires_grad_(False)  # type: ignore[arg-type]  # transformers types .to unbound
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.path))
        self.device, self.batch_size = torch.device(device), batch_size
        self.size = int(self.model.config.vision_config.image_size)
        self.mean, self.std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
        pre = self.path / "preprocessor_config.json"
        if pre.is_file():
            cfg = json.loads(pre.read_text())
            self.mean, self.std = (
                tuple(cfg.get("image_mean", self.mean)),
                tuple(cfg.get("image_std", self.std)),
            )
        self.max_length = int(self.model.config.text_config.max_position_embeddings)

    @torch.no_grad()
    def images(self, images: Sequence[Image.Image]) -> np.ndarray:
        out = []
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        for i in range(0, len(images), self.batch_size):
            x = to_tensor([square_crop(im, self.size) for im in images[i : i + self.batch_size]])
            x = ((x - mean) / std).to(self.device)
            out.append(F.normalize(_features(self.model.get_image_features(pixel_values=x)), dim=-1).cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, self.model.config.projection_dim), np.float32)

    def texts(self, texts: Sequence[str]) -> np.ndarray:
        return text_features(self, texts, max_length=self.max_length)


class ClapEmbedder:
    """ClapModel + its tokenizer and feature extractor (``preprocessor_config.json`` in the folder).

    Clips longer than the extractor's window are cut to their first ``max_length_s`` seconds
    rather than randomly cropped, so that scores are reproducible."""

    def __init__(self, path: str | Path | None, device: str | torch.device = "cpu", batch_size: int = 16):
        from transformers import (  # deferred: CLAP's classes cost ~2 s; only an embedder needs them
            AutoTokenizer,
            ClapFeatureExtractor,
            ClapModel,
        )

        self.path = _check_folder(path, "CLAP", "clap")
        if not (self.path / "preprocessor_config.json").is_file():
            raise Unavailable(
                f"CLAP folder {self.path} has no preprocessor_config.json (its feature extractor)"
            )
        model = ClapModel.from_pretrained(str(self.path))
        self.model = model.to(device).eval().requires_grad_(False)  # type: ignore[arg-type]  # transformers types .to unbound
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.path))
        self.extractor = ClapFeatureExtractor.from_pretrained(str(self.path))
        self.device, self.batch_size = torch.device(device), batch_size
        self.truncation = (
            "fusion" if getattr(self.model.config.audio_config, "enable_fusion", False) else "rand_trunc"
        )

    @torch.no_grad()
    def audios(self, waves: Sequence[tuple[np.ndarray, int]]) -> np.ndarray:
        rate = int(self.extractor.sampling_rate)
        clips = []
        for wave, sr in waves:
            t = torch.as_tensor(np.asarray(wave, dtype=np.float32)).reshape(1, -1)
            w = resample(t, int(sr), rate)[0].numpy() if sr != rate else t[0].numpy()
            clips.append(w[: int(self.extractor.nb_max_samples)])
        out = []
        for i in range(0, len(clips), self.batch_size):
            x = self.extractor(
                clips[i : i + self.batch_size],
                sampling_rate=rate,
                return_tensors="pt",
                truncation=self.truncation,
            )
            feats = self.model.get_audio_features(
                input_features=x["input_features"].to(self.device),
                is_longer=x["is_longer"].to(self.device) if "is_longer" in x else None,
            )
            out.append(F.normalize(_features(feats), dim=-1).cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, self.model.config.projection_dim), np.float32)

    def texts(self, texts: Sequence[str]) -> np.ndarray:
        return text_features(self, texts)
