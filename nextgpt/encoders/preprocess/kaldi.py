"""Kaldi's log-mel filterbank (``torchaudio.compliance.kaldi.fbank`` with ImageBind's options) in plain torch."""

from __future__ import annotations

import math
from typing import overload

import torch
import torch.nn.functional as F


@overload
def _mel_scale(freq: torch.Tensor) -> torch.Tensor: ...
@overload
def _mel_scale(freq: float) -> float: ...
def _mel_scale(freq: torch.Tensor | float) -> torch.Tensor | float:
    if isinstance(freq, torch.Tensor):
        return 1127.0 * (1.0 + freq / 700.0).log()
    return 1127.0 * math.log(1.0 + freq / 700.0)


def _mel_banks(num_bins: int, padded_window: int, sample_rate: float, low_freq: float = 20.0) -> torch.Tensor:
    """Kaldi's triangular HTK-mel filterbank, (num_bins, padded_window // 2 + 1) (last column zero)."""
    num_fft_bins = padded_window // 2
    nyquist = 0.5 * sample_rate
    high_freq = nyquist  # Kaldi high_freq=0 means "Nyquist"
    if not 0.0 <= low_freq < high_freq:
        raise ValueError(f"bad mel range [{low_freq}, {high_freq}] for sample rate {sample_rate}")
    fft_bin_width = sample_rate / padded_window
    mel_low, mel_high = _mel_scale(low_freq), _mel_scale(high_freq)
    delta = (mel_high - mel_low) / (num_bins + 1)
    b = torch.arange(num_bins).unsqueeze(1)
    left = mel_low + b * delta
    center = mel_low + (b + 1.0) * delta
    right = mel_low + (b + 2.0) * delta
    mel = _mel_scale(fft_bin_width * torch.arange(num_fft_bins)).unsqueeze(0)
    up = (mel - left) / (center - left)
    down = (right - mel) / (right - center)
    banks = torch.max(torch.zeros(1), torch.min(up, down))
    return F.pad(banks, (0, 1), value=0.0)


def kaldi_fbank(
    waveform: torch.Tensor,
    sample_rate: int,
    num_mel_bins: int,
    frame_length_ms: float = 25.0,
    frame_shift_ms: float = 10.0,
) -> torch.Tensor:
    """Log-mel filterbank, (frames, num_mel_bins): ``torchaudio.compliance.kaldi.fbank`` with ImageBind's options.

    Those are htk_compat=True, use_energy=False, window_type="hanning" (symmetric Hann), dither=0,
    and the Kaldi defaults: snip_edges (frames = 1 + (n - win) // shift), per-frame DC removal,
    pre-emphasis 0.97, FFT size rounded up to a power of two, power spectrum, mel bins from 20 Hz to
    Nyquist, log floored at float32 eps. ``waveform`` is (n,) or (channels, n); like torchaudio only
    channel 0 is used. Shorter than one window gives (0, num_mel_bins) instead of torchaudio's assert.
    """
    if waveform.ndim == 2:
        waveform = waveform[0]
    elif waveform.ndim != 1:
        raise ValueError(f"waveform must be (n,) or (channels, n), got {tuple(waveform.shape)}")
    if not waveform.is_floating_point():
        waveform = waveform.float()
    window_shift = int(sample_rate * frame_shift_ms * 0.001)
    window_size = int(sample_rate * frame_length_ms * 0.001)
    if window_size < 2 or window_shift < 1:
        raise ValueError(
            f"frame length {frame_length_ms} ms / shift {frame_shift_ms} ms too short at {sample_rate} Hz"
        )
    padded = 1 if window_size == 0 else 2 ** (window_size - 1).bit_length()
    n = waveform.shape[0]
    if n < window_size:
        return waveform.new_zeros((0, num_mel_bins))
    num_frames = 1 + (n - window_size) // window_shift
    waveform = waveform.contiguous()
    frames = waveform.as_strided(
        (num_frames, window_size), (window_shift * waveform.stride(0), waveform.stride(0))
    )
    frames = frames - frames.mean(dim=1, keepdim=True)  # remove_dc_offset
    previous = F.pad(frames.unsqueeze(0), (1, 0), mode="replicate").squeeze(0)  # x[-1] := x[0]
    frames = frames - 0.97 * previous[:, :-1]  # pre-emphasis
    frames = frames * torch.hann_window(window_size, periodic=False, dtype=frames.dtype)
    frames = F.pad(frames, (0, padded - window_size))
    power = torch.fft.rfft(frames).abs().pow(2.0)
    banks = _mel_banks(num_mel_bins, padded, float(sample_rate)).to(dtype=power.dtype)
    mel = torch.mm(power, banks.T)
    return torch.max(mel, torch.tensor(torch.finfo(torch.float).eps, dtype=mel.dtype)).log()
