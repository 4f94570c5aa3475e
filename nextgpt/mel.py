"""AudioLDM's waveform -> log-mel front end: the space its VAE encodes and its vocoder reads.

AudioLDM trains on the log-magnitude mel spectrogram of HiFi-GAN (its ``TacotronSTFT``): a reflect
pad of ``(n_fft - hop) / 2`` on each side, an uncentred STFT with a Hann window, magnitudes, a
Slaney mel filter bank (librosa's default) and ``log(clamp(x, 1e-5))``. The vocoder turns one mel
frame into ``hop`` samples, so the front end is read off the vocoder config, once:

- ``n_mels`` = ``model_in_dim``, ``hop`` = ``prod(upsample_rates)``, ``sampling_rate``;
- ``n_fft`` = ``win_length`` = the power of two at or above ``4 * hop``, ``fmin`` = 0, ``fmax`` =
  ``sampling_rate / 2``.

For AudioLDM (``cvssp/audioldm-*``: 64 mels, upsample rates 5 4 2 2 2, 16 kHz) that is its own
setting: n_fft 1024, hop 160, window 1024, 0-8000 Hz. The frame count follows the pipeline's
``audio_length_in_s`` arithmetic: ``samples / hop`` frames, rounded up to a multiple of the VAE's
scale factor with silence (``log(1e-5)``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

SILENCE = 1e-5  # the clamp of HiFi-GAN's dynamic range compression: log(SILENCE) is the floor


@dataclass(frozen=True)
class MelFrontEnd:
    sampling_rate: int
    n_mels: int
    hop: int
    n_fft: int
    fmin: float = 0.0
    fmax: float | None = None  # None: sampling_rate / 2

    @classmethod
    def from_vocoder(cls, config: dict | str | Path) -> MelFrontEnd:
        """The front end of a vocoder config (a dict, ``vocoder/config.json`` or its folder)."""
        if isinstance(config, dict):
            values: dict[str, Any] = config
        else:
            path = Path(config)
            path = path / "config.json" if path.is_dir() else path
            values = json.loads(path.read_text())
        try:
            hop = math.prod(int(r) for r in values["upsample_rates"])
            rate, n_mels = int(values["sampling_rate"]), int(values["model_in_dim"])
        except KeyError as e:
            raise ValueError(
                f"the vocoder config has no {e.args[0]!r}: can not derive its mel front end"
            ) from None
        return cls(sampling_rate=rate, n_mels=n_mels, hop=hop, n_fft=1 << math.ceil(math.log2(4 * hop)))

    def filter_bank(self) -> torch.Tensor:
        """(n_fft // 2 + 1, n_mels) Slaney-normalised triangles on the Slaney mel scale."""
        from transformers.audio_utils import (  # deferred: transformers costs ~1 s; only the filter bank needs it
            mel_filter_bank,
        )

        fmax = self.sampling_rate / 2 if self.fmax is None else self.fmax
        bank = mel_filter_bank(
            num_frequency_bins=self.n_fft // 2 + 1,
            num_mel_filters=self.n_mels,
            min_frequency=self.fmin,
            max_frequency=fmax,
            sampling_rate=self.sampling_rate,
            norm="slaney",
            mel_scale="slaney",
        )
        return torch.from_numpy(np.asarray(bank, dtype=np.float32))

    def frames(self, samples: int, multiple: int = 1) -> int:
        """Mel frames for ``samples`` samples, rounded up to ``multiple`` (the VAE's scale factor)."""
        return -(-(samples // self.hop) // multiple) * multiple

    def __call__(self, waveform: torch.Tensor, multiple: int = 1) -> torch.Tensor:
        """(B, samples) waveforms in [-1, 1] -> (B, 1, frames, n_mels) log-mel, AudioLDM's VAE input."""
        if waveform.ndim != 2:
            raise ValueError(f"expected (batch, samples) waveforms, got shape {tuple(waveform.shape)}")
        x = waveform.float()
        pad = (self.n_fft - self.hop) // 2
        x = F.pad(x.unsqueeze(1), (pad, pad), mode="reflect").squeeze(1)
        window = torch.hann_window(self.n_fft, device=x.device)
        spec = torch.stft(
            x,
            self.n_fft,
            hop_length=self.hop,
            win_length=self.n_fft,
            window=window,
            center=False,
            return_complex=True,
        ).abs()  # (B, freq, frames)
        mel = torch.log(torch.clamp(self.filter_bank().to(x.device).T @ spec, min=SILENCE)).transpose(1, 2)
        want = self.frames(waveform.shape[1], multiple)
        mel = mel[:, :want]
        if mel.shape[1] < want:
            mel = F.pad(mel, (0, 0, 0, want - mel.shape[1]), value=math.log(SILENCE))
        return mel.unsqueeze(1)
