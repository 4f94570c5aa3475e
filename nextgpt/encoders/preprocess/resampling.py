"""Band-limited resampling: torchaudio's ``sinc_interp_hann`` polyphase filter in plain torch, for a whole
waveform (:func:`resample`) or for just the outputs a span of it gives (:func:`resample_source`)."""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F


@lru_cache(maxsize=16)
def _sinc_kernel(
    orig: int, new: int, lowpass_filter_width: int = 6, rolloff: float = 0.99
) -> tuple[torch.Tensor, int]:
    """Polyphase windowed-sinc (Hann) kernels, torchaudio's ``sinc_interp_hann`` defaults; rates reduced by gcd.

    Computed in float32 with the same operation order as torchaudio, so results match it bit for bit.
    """
    base = min(orig, new) * rolloff
    width = math.ceil(lowpass_filter_width * orig / base)
    idx = torch.arange(-width, width + orig, dtype=torch.float32)[None, None] / orig
    t = torch.arange(0, -new, -1, dtype=torch.float32)[:, None, None] / new + idx
    t = (t * base).clamp_(-lowpass_filter_width, lowpass_filter_width)
    window = torch.cos(t * math.pi / lowpass_filter_width / 2) ** 2
    t = t * math.pi
    kernels = torch.where(t == 0, torch.tensor(1.0), t.sin() / t)
    kernels *= window * (base / orig)
    return kernels, width


def resampled_length(n: int, orig_freq: int, new_freq: int) -> int:
    """Samples :func:`resample` returns for n: ceil(n * new / orig), rates reduced by gcd, float32 as torchaudio."""
    if orig_freq == new_freq:
        return n
    g = math.gcd(int(orig_freq), int(new_freq))
    orig, new = int(orig_freq) // g, int(new_freq) // g
    return int(torch.ceil(torch.as_tensor(new * n / orig)))  # float32 rounding, as torchaudio


def _sinc_blocks(x: torch.Tensor, orig: int, new: int) -> torch.Tensor:
    """The polyphase filter over already padded (batch, m) float32 input: (batch, blocks * new) output samples."""
    kernel, _ = _sinc_kernel(orig, new)
    y = F.conv1d(x[:, None], kernel, stride=orig)  # (batch, new, blocks)
    return y.transpose(1, 2).reshape(x.shape[0], -1)


def resample(waveform: torch.Tensor, orig_freq: int, new_freq: int) -> torch.Tensor:
    """Band-limited resampling of (..., n), torchaudio.functional.resample's algorithm in plain torch.

    Windowed-sinc (Hann, 6 zero crossings, rolloff 0.99) polyphase filter applied with a strided conv1d;
    output length ceil(n * new / orig). float32 throughout, as torchaudio for float32 input.
    """
    if orig_freq <= 0 or new_freq <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_freq} -> {new_freq}")
    if orig_freq == new_freq:
        return waveform
    g = math.gcd(int(orig_freq), int(new_freq))
    orig, new = int(orig_freq) // g, int(new_freq) // g
    _, width = _sinc_kernel(orig, new)
    shape = waveform.shape
    x = waveform.reshape(-1, shape[-1]).to(torch.float32)
    y = _sinc_blocks(F.pad(x, (width, width + orig)), orig, new)
    return y[..., : resampled_length(shape[-1], orig_freq, new_freq)].reshape(*shape[:-1], -1)


def resample_source(a: int, b: int, orig_freq: int, new_freq: int) -> tuple[int, int, int]:
    """Input samples [lo, hi) that :func:`resample`'s outputs [a, b) depend on, and the output index of lo's block.

    resample() pads ``width`` zeros in front and makes output block j (samples j*new .. j*new + new - 1)
    from padded inputs j*orig .. j*orig + 2*width + orig - 1, so resampling just that span, zero-filled
    outside the file, gives the whole-file values: no edge effects, only float summation order may differ.
    """
    if orig_freq == new_freq:
        return a, b, a
    g = math.gcd(int(orig_freq), int(new_freq))
    orig, new = int(orig_freq) // g, int(new_freq) // g
    _, width = _sinc_kernel(orig, new)
    first, last = a // new, (b - 1) // new
    return first * orig - width, (last + 1) * orig + width, first * new


def resample_span(x: torch.Tensor, orig_freq: int, new_freq: int) -> torch.Tensor:
    """resample() outputs from (1, m) input laid out as :func:`resample_source` says (no padding added here)."""
    if orig_freq == new_freq:
        return x
    g = math.gcd(int(orig_freq), int(new_freq))
    return _sinc_blocks(x.to(torch.float32), int(orig_freq) // g, int(new_freq) // g)
