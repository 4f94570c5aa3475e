"""AudioLDM's waveform -> log-mel front end (nextgpt.mel) and the audio denoising target: the setting
is read off the vocoder config, a tone lands in its mel band at the level its amplitude says, the
frame grid is the one the AudioLDM pipeline denoises, and a clip file becomes the waveform target."""

from __future__ import annotations

import math

import numpy as np
import pytest
import soundfile as sf
import torch

from nextgpt.mel import SILENCE, MelFrontEnd
from nextgpt.model_spec import DecoderSpec

AUDIOLDM_VOCODER = {
    "model_in_dim": 64,
    "sampling_rate": 16000,
    "upsample_rates": [5, 4, 2, 2, 2],
}  # cvssp/audioldm


def tone(freq: float, seconds: float, rate: int = 16000, amplitude: float = 0.5) -> torch.Tensor:
    t = torch.arange(round(seconds * rate), dtype=torch.float64) / rate
    return (amplitude * torch.sin(2 * math.pi * freq * t)).float()


def slaney_mel(freq: float) -> float:
    """librosa's Slaney mel scale: linear below 1 kHz, logarithmic above."""
    return freq / (200.0 / 3) if freq < 1000 else 15.0 + math.log(freq / 1000.0) / (math.log(6.4) / 27.0)


def test_the_audioldm_setting_is_read_off_its_vocoder():
    mel = MelFrontEnd.from_vocoder(AUDIOLDM_VOCODER)
    assert (mel.n_mels, mel.hop, mel.n_fft, mel.sampling_rate) == (64, 160, 1024, 16000)  # TacotronSTFT's
    with pytest.raises(ValueError, match="no 'upsample_rates'"):
        MelFrontEnd.from_vocoder({"model_in_dim": 64, "sampling_rate": 16000})


@pytest.mark.parametrize("freq", [300.0, 1000.0, 2500.0, 6000.0])
def test_a_tone_lands_in_its_mel_band(freq):
    mel = MelFrontEnd.from_vocoder(AUDIOLDM_VOCODER)
    x = mel(tone(freq, 0.5)[None])
    assert x.shape == (1, 1, 50, 64)  # 8000 samples / hop 160
    band = int(x[0, 0, 10:40].mean(0).argmax())
    edges = np.linspace(
        slaney_mel(0.0), slaney_mel(8000.0), 64 + 2
    )  # band k spans edges k .. k + 2, peaking at k + 1
    assert edges[band] <= slaney_mel(freq) <= edges[band + 2], (freq, band)


def test_level_follows_amplitude_and_silence_is_the_floor():
    mel = MelFrontEnd.from_vocoder(AUDIOLDM_VOCODER)
    loud, quiet = mel(tone(1000, 0.5, amplitude=0.5)[None]), mel(tone(1000, 0.5, amplitude=0.05)[None])
    band = int(loud[0, 0, 20].argmax())
    assert float(loud[0, 0, 20, band] - quiet[0, 0, 20, band]) == pytest.approx(
        math.log(10.0), abs=1e-3
    )  # log magnitude
    assert torch.all(mel(torch.zeros(1, 8000)) == math.log(SILENCE))


def test_frames_round_up_to_the_vae_grid_with_silence():
    mel = MelFrontEnd.from_vocoder(AUDIOLDM_VOCODER)
    x = mel(tone(1000, 0.3)[None], multiple=4)  # 4800 samples: 30 frames -> 32
    assert (
        x.shape[2] == 32
        and torch.all(x[0, 0, 30:] == math.log(SILENCE))
        and torch.all(x[0, 0, 5:25].max(-1).values > -5)
    )
    with pytest.raises(ValueError, match="expected \\(batch, samples\\)"):
        mel(torch.zeros(1, 1, 8000))


@pytest.mark.parametrize("seconds", [0.256, 0.3])
def test_the_latent_grid_is_the_one_the_pipeline_denoises(tiny_cache, seconds):
    from diffusers import AudioLDMPipeline

    from nextgpt.decoders import target_spec
    from nextgpt.denoising import DenoisingObjective

    path = tiny_cache / "tiny_backbones" / "audioldm"
    pipe = AudioLDMPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    seen = []
    forward = pipe.unet.forward
    pipe.unet.forward = lambda sample, *a, **k: (seen.append(tuple(sample.shape)), forward(sample, *a, **k))[
        1
    ]
    pipe(
        prompt_embeds=torch.nn.functional.normalize(torch.randn(1, 16), dim=-1),
        num_inference_steps=1,
        audio_length_in_s=seconds,
        guidance_scale=1.0,
    )
    spec = target_spec(DecoderSpec(str(path), "text_embeds", generate={"audio_length_in_s": seconds}))
    assert spec["sampling_rate"] == 16000
    obj = DenoisingObjective(path, "text_embeds")
    latents = obj.latents(tone(1000, spec["audio_length_in_s"])[None])
    assert tuple(latents.shape[1:]) == seen[0][1:]


def test_the_pipeline_default_length_is_filled_in(tiny_cache):
    from nextgpt.decoders import target_spec

    spec = target_spec(
        DecoderSpec(
            str(tiny_cache / "tiny_backbones" / "audioldm"),
            "text_embeds",
            generate={"num_inference_steps": 4},
        )
    )
    assert spec["audio_length_in_s"] == pytest.approx(
        32 * 2 * 16 / 16000
    )  # unet sample 32 x VAE 2 x hop 16 at 16 kHz
    assert "sampling_rate" not in target_spec(
        DecoderSpec(str(tiny_cache / "tiny_backbones" / "sd"), "last_hidden_state", generate={"height": 32})
    )  # no vocoder


def test_a_clip_becomes_the_waveform_target(tmp_path):
    from nextgpt import modality

    path = tmp_path / "a.wav"
    sf.write(path, np.stack([tone(440, 0.1, rate=22050).numpy()] * 2, 1), 22050)  # stereo, 22.05 kHz, 0.1 s
    wave = modality.get("audio").load_target(path, {"sampling_rate": 16000, "audio_length_in_s": 0.256})
    assert wave.shape == (4096,) and torch.all(wave[1700:] == 0)  # 1600 samples of tone, then zeros
    spectrum = np.abs(np.fft.rfft(wave[:1600].numpy()))
    assert abs(np.argmax(spectrum) * 16000 / 1600 - 440) <= 10
    longer = tmp_path / "b.wav"
    sf.write(longer, tone(440, 1.0).numpy(), 16000)
    assert modality.get("audio").load_target(
        longer, {"sampling_rate": 16000, "audio_length_in_s": 0.256}
    ).shape == (4096,)
