"""VGGish audio embeddings for FAD, in plain PyTorch and numpy.

The network's parameter names follow the PyTorch port of VGGish (``vggish-10086976.pth``:
``features.{0,3,6,8,11,13}`` convolutions, ``embeddings.{0,2,4}`` fully connected layers), so
that file loads from a local path. Input is VGGish's own front end: 16 kHz mono, 25 ms periodic
Hann windows every 10 ms, 512-point FFT magnitude, 64 mel bands (HTK scale, 125-7500 Hz),
log(mel + 0.01), cut into 0.96 s examples of 96 frames. As in the usual FAD setup the embedding
is the last layer's 128-d output before its ReLU and without the PCA post-processing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from nextgpt.encoders.preprocess.resampling import resample
from nextgpt.metrics import Unavailable

SAMPLE_RATE = 16000
WINDOW, HOP, FFT = 400, 160, 512
MEL_BINS, MEL_LOW, MEL_HIGH = 64, 125.0, 7500.0
EXAMPLE_FRAMES = 96
LOG_OFFSET = 0.01
EMBEDDING_DIM = 128


def _hz_to_mel(f: np.ndarray | float) -> np.ndarray:
    return 1127.0 * np.log1p(np.asarray(f, dtype=np.float64) / 700.0)


def mel_matrix() -> np.ndarray:
    """(FFT // 2 + 1, 64) triangular weights on the mel scale; the DC bin gets no weight."""
    bins = FFT // 2 + 1
    bin_mel = _hz_to_mel(np.linspace(0.0, SAMPLE_RATE / 2, bins))
    edges = np.linspace(_hz_to_mel(MEL_LOW), _hz_to_mel(MEL_HIGH), MEL_BINS + 2)
    lower, centre, upper = edges[:-2], edges[1:-1], edges[2:]
    rising = (bin_mel[:, None] - lower) / (centre - lower)
    falling = (upper - bin_mel[:, None]) / (upper - centre)
    weights = np.maximum(0.0, np.minimum(rising, falling))
    weights[0, :] = 0.0
    return weights


def log_mel_examples(wave: np.ndarray) -> np.ndarray:
    """16 kHz mono waveform -> (N, 96, 64) log-mel examples. A clip shorter than one example is
    zero-padded to 0.96 s so that it still yields one embedding."""
    wave = np.asarray(wave, dtype=np.float64).reshape(-1)
    min_len = WINDOW + HOP * (EXAMPLE_FRAMES - 1)
    if len(wave) < min_len:
        wave = np.pad(wave, (0, min_len - len(wave)))
    n_frames = 1 + (len(wave) - WINDOW) // HOP
    idx = np.arange(WINDOW)[None, :] + HOP * np.arange(n_frames)[:, None]
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(WINDOW) / WINDOW)  # periodic Hann
    spectrum = np.abs(np.fft.rfft(wave[idx] * window, n=FFT))
    log_mel = np.log(spectrum @ mel_matrix() + LOG_OFFSET)
    n_examples = 1 + (n_frames - EXAMPLE_FRAMES) // EXAMPLE_FRAMES
    return np.stack(
        [log_mel[i * EXAMPLE_FRAMES : (i + 1) * EXAMPLE_FRAMES] for i in range(n_examples)]
    ).astype(np.float32)


class VGGish(nn.Module):
    """``forward((N, 1, 96, 64) log-mel examples)`` -> (N, 128) embeddings."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 1
        for v in (64, "M", 128, "M", 256, 256, "M", 512, 512, "M"):
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(cin, int(v), 3, padding=1), nn.ReLU(inplace=True)]
                cin = int(v)
        self.features = nn.Sequential(*layers)
        self.embeddings = nn.Sequential(
            nn.Linear(512 * 6 * 4, 4096),
            nn.ReLU(inplace=True),
            nn.Linear(4096, 4096),
            nn.ReLU(inplace=True),
            nn.Linear(4096, EMBEDDING_DIM),
        )

    def forward(self, examples: torch.Tensor) -> torch.Tensor:
        x = self.features(examples)  # (N, 512, 6, 4)
        x = x.permute(0, 2, 3, 1).flatten(1)  # TensorFlow's (H, W, C) flattening order
        return self.embeddings(x)

    @torch.no_grad()
    def embed(self, wave: np.ndarray, sample_rate: int) -> np.ndarray:
        """One clip -> (N examples, 128)."""
        w = torch.as_tensor(np.asarray(wave, dtype=np.float32))
        if w.ndim > 1:  # (samples, channels) as soundfile reads it
            w = w.mean(-1)
        if sample_rate != SAMPLE_RATE:
            w = resample(w.unsqueeze(0), sample_rate, SAMPLE_RATE)[0]
        device = next(self.parameters()).device
        x = torch.from_numpy(log_mel_examples(w.numpy())).unsqueeze(1).to(device)
        return self(x).cpu().numpy()


def load_vggish(path: str | Path | None, device: str | torch.device = "cpu") -> VGGish:
    if path is None or not Path(path).is_file():
        raise Unavailable(
            f"VGGish weights not found at {path} (the PyTorch port's vggish-10086976.pth; "
            "set feature_nets.vggish=PATH, or metrics.fad_backbone=clap)"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = {k: v for k, v in state.items() if not k.startswith("pproc.")}  # PCA parameters: unused for FAD
    model = VGGish()
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{path} is not a VGGish state dict: {e}") from None
    return model.to(device).eval().requires_grad_(False)
