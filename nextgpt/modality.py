"""The modality registry: everything that differs between image, audio and video lives here.

No other module branches on a modality name. Adding a modality means one file in
``nextgpt/modalities/`` (a ``register(Modality(...))`` call with its loader, and its writer when it
is generated), found by :func:`_register_plugins`, one ``model.modalities`` entry (a decoder, or
``decoder: null`` for an input-only modality) and one dataset YAML; ``nextgpt/modalities/depth.py``
is the example.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict, cast

import numpy as np
import soundfile as sf
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

import nextgpt.modalities as plugins
from nextgpt.encoders.preprocess import MediaDecodeError, load_audio, load_image, load_video
from nextgpt.encoders.preprocess.audio import load_waveform

Loader = Callable[[Path], torch.Tensor]


class MediaMeta(TypedDict, total=False):
    """What a generated file records beside it (``<file>.json``) and in its own metadata: the request,
    and the decoder's ``save`` settings (``model.modalities.<m>.decoder.save``: ``fps`` for video)."""

    prompt: str
    answer: str
    seed: int
    bundle: str
    fps: int  # video: frames per second of the written file
    sample_rate: int  # audio: the vocoder's (added by the writer)
    caption: str  # the decoder alone (evaluation's ceiling): the caption it decoded
    decoder_alone: bool


def media_meta(prompt: str, answer: str, seed: int, bundle: str, save: Mapping[str, object]) -> MediaMeta:
    """The metadata of one generated file; ``save``'s keys are recorded too."""
    return cast(MediaMeta, {"prompt": prompt, "answer": answer, "seed": seed, "bundle": bundle, **save})


Writer = Callable[[np.ndarray, Path, Any, MediaMeta], Path]
# target media for the denoising loss, in the decoder's pixel (or waveform) space, sized by its generation settings


class TargetSpec(TypedDict, total=False):
    """How a denoising-loss target is sized for its decoder: the decoder's generation settings
    (``model.modalities.<m>.decoder.generate``) with what :func:`nextgpt.decoders.target_spec` adds."""

    width: int  # image, video
    height: int  # image, video
    num_frames: int  # video
    sampling_rate: int  # audio: the vocoder's
    audio_length_in_s: float  # audio


TargetLoader = Callable[[Path, TargetSpec], torch.Tensor]


@dataclass(frozen=True)
class Modality:
    """One modality: its tokens, its data layout, how its media is read and written."""

    name: str  # "image"
    tag: str  # "Img": gives <Img> </Img> around inputs
    signal_prefix: str  # "IMG": gives [IMG0] .. [IMG{n-1}]
    default_num_signal_tokens: int
    encoder_modality: str  # the ImageBind trunk that encodes it ("vision", "audio")
    media_folder: str  # folder under a NExT-GPT dataset root ("images")
    extensions: tuple[str, ...]
    output_suffix: str  # file suffix of generated media
    pipeline_output: str  # attribute of the diffusers pipeline output holding the arrays
    loader: Loader = field(repr=False, compare=False, default=None)  # type: ignore[assignment]
    writer: Writer = field(repr=False, compare=False, default=None)  # type: ignore[assignment]
    target_loader: TargetLoader | None = field(repr=False, compare=False, default=None)

    # --- token strings -------------------------------------------------------------------
    @property
    def open_token(self) -> str:
        return f"<{self.tag}>"

    @property
    def close_token(self) -> str:
        return f"</{self.tag}>"

    def signal_tokens(self, n: int | None = None) -> list[str]:
        n = self.default_num_signal_tokens if n is None else n
        return [f"[{self.signal_prefix}{i}]" for i in range(n)]

    # --- NExT-GPT JSON layout --------------------------------------------------------------
    @property
    def placeholder(self) -> str:
        """The marker that LLaVA-style conversations use for this modality ("<image>")."""
        return f"<{self.name}>"

    @property
    def name_field(self) -> str:
        return f"{self.name}_name"

    @property
    def input_field(self) -> str:
        return f"input_{self.name}"

    @property
    def output_field(self) -> str:
        return f"output_{self.name}"

    @property
    def captions_field(self) -> str:
        return f"{self.name}_captions"

    def load(self, source) -> torch.Tensor:
        """ImageBind input from a path, bytes or a binary file object (shard members)."""
        return self.loader(Path(source) if isinstance(source, str) else source)

    def write(self, array: np.ndarray, path: Path, pipeline: Any, meta: MediaMeta) -> Path:
        return self.writer(array, path, pipeline, meta)

    def load_target(self, path: str | Path, spec: Mapping[str, Any]) -> torch.Tensor:
        """Target media in [-1, 1] at the decoder's size, for the denoising loss."""
        if self.target_loader is None:
            raise NotImplementedError(f"no denoising-loss target loader for modality {self.name!r}")
        # the decoder's generation settings: the keys a loader reads are TargetSpec's
        return self.target_loader(Path(path) if isinstance(path, str) else path, cast(TargetSpec, spec))


_REGISTRY: dict[str, Modality] = {}


def register(modality: Modality) -> Modality:
    if modality.name in _REGISTRY:
        raise ValueError(f"modality {modality.name!r} is already registered")
    _REGISTRY[modality.name] = modality
    return modality


def get(name: str) -> Modality:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown modality {name!r}; registered: {sorted(_REGISTRY)}") from None


def names() -> list[str]:
    return list(_REGISTRY)


# --- denoising-loss targets: media in the decoder's own pixel space ---------------------------
def _fit(image, width: int, height: int):
    """Centre-crop to the target aspect ratio, then resize (bicubic)."""
    w, h = image.size
    scale = max(width / w, height / h)
    rw, rh = max(width, round(w * scale)), max(height, round(h * scale))
    image = image.resize((rw, rh), Image.Resampling.BICUBIC)
    left, top = (rw - width) // 2, (rh - height) // 2
    return image.crop((left, top, left + width, top + height))


def _pixels(image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)


def _target_image(path: Path, spec: TargetSpec) -> torch.Tensor:
    try:
        with Image.open(path) as im:
            return _pixels(_fit(im.convert("RGB"), int(spec["width"]), int(spec["height"])))
    except (OSError, ValueError) as e:
        raise MediaDecodeError(path, f"can not read the target image: {e}") from e


def _target_video(path: Path, spec: TargetSpec) -> torch.Tensor:
    """(3, frames, H, W): ``num_frames`` frames spread evenly over the clip."""
    import av  # deferred: PyAV (FFmpeg) costs ~0.06 s and the registry's importers rarely touch video

    try:
        with av.open(str(path)) as container:
            frames = [f.to_image() for f in container.decode(video=0)]
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise MediaDecodeError(path, f"can not read the target video: {e}") from e
    if not frames:
        raise MediaDecodeError(path, "the target video has no frames")
    n = int(spec["num_frames"])
    picks = [frames[min(len(frames) - 1, int(i * len(frames) / n))] for i in range(n)]
    size = (int(spec["width"]), int(spec["height"]))
    return torch.stack([_pixels(_fit(Image.Image.convert(f, "RGB"), *size)) for f in picks], dim=1)


def _target_audio(path: Path, spec: TargetSpec) -> torch.Tensor:
    """(samples,): the first ``audio_length_in_s`` of the clip, mono at the decoder's ``sampling_rate``
    (:func:`nextgpt.decoders.target_spec` adds both); the denoising loss takes its log-mel (nextgpt.mel)."""
    wave = load_waveform(
        path, sample_rate=int(spec["sampling_rate"]), seconds=float(spec["audio_length_in_s"])
    )
    return wave.clamp(-1.0, 1.0)


# --- writers: generated arrays -> files, with the generation metadata -----------------------
def _sidecar(path: Path, meta: MediaMeta) -> None:
    path.with_suffix(path.suffix + ".json").write_text(json.dumps(meta, indent=2, default=str))


def _to_uint8(array: np.ndarray) -> np.ndarray:
    return (np.clip(np.asarray(array, dtype=np.float32), 0.0, 1.0) * 255).round().astype(np.uint8)


def _write_png(array: np.ndarray, path: Path, pipeline: Any, meta: MediaMeta) -> Path:
    info = PngInfo()
    for key, value in meta.items():
        info.add_text(str(key), str(value))
    Image.fromarray(_to_uint8(array)).save(path, pnginfo=info)
    _sidecar(path, meta)
    return path


def _write_wav(array: np.ndarray, path: Path, pipeline: Any, meta: MediaMeta) -> Path:

    rate = int(pipeline.vocoder.config.sampling_rate)
    wave = np.asarray(array, dtype=np.float32).reshape(-1)
    with sf.SoundFile(path, "w", samplerate=rate, channels=1, subtype="PCM_16") as f:
        f.comment = json.dumps(meta, default=str)[:1000]
        f.write(np.clip(wave, -1.0, 1.0))
    _sidecar(path, {**meta, "sample_rate": rate})
    return path


def _write_mp4(array: np.ndarray, path: Path, pipeline: Any, meta: MediaMeta) -> Path:
    import av  # deferred: PyAV (FFmpeg) costs ~0.06 s and the registry's importers rarely touch video

    frames = _to_uint8(array)  # (F, H, W, 3)
    fps = int(meta.get("fps", 8))
    height, width = frames.shape[1] // 2 * 2, frames.shape[2] // 2 * 2  # yuv420p needs even sizes
    with av.open(str(path), mode="w") as container:
        container.metadata["comment"] = json.dumps(meta, default=str)
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for frame in frames:
            video_frame = av.VideoFrame.from_ndarray(
                np.ascontiguousarray(frame[:height, :width]), format="rgb24"
            )
            container.mux(stream.encode(video_frame))
        container.mux(stream.encode())
    _sidecar(path, meta)
    return path


IMAGE = register(
    Modality(
        name="image",
        tag="Img",
        signal_prefix="IMG",
        default_num_signal_tokens=4,
        encoder_modality="vision",
        media_folder="images",
        extensions=(".jpg", ".jpeg", ".png", ".webp"),
        output_suffix=".png",
        pipeline_output="images",
        loader=load_image,
        writer=_write_png,
        target_loader=_target_image,
    )
)
AUDIO = register(
    Modality(
        name="audio",
        tag="Aud",
        signal_prefix="AUD",
        default_num_signal_tokens=8,
        encoder_modality="audio",
        media_folder="audios",
        extensions=(".wav", ".flac", ".mp3", ".ogg"),
        output_suffix=".wav",
        pipeline_output="audios",
        loader=load_audio,
        writer=_write_wav,
        target_loader=_target_audio,
    )
)
VIDEO = register(
    Modality(
        name="video",
        tag="Vid",
        signal_prefix="VID",
        default_num_signal_tokens=24,
        encoder_modality="vision",
        media_folder="videos",
        extensions=(".mp4", ".webm", ".mkv", ".avi"),
        output_suffix=".mp4",
        pipeline_output="frames",
        loader=load_video,
        writer=_write_mp4,
        target_loader=_target_video,
    )
)


def _register_plugins() -> None:
    """Register the modalities of ``nextgpt/modalities/*.py``, one file each, in name order (after
    the built-in three, whose order fixes the token layout of existing bundles). Imported by name
    (a plugin imports this module, so its module is imported once the registry above exists)."""
    for info in sorted(pkgutil.iter_modules(plugins.__path__), key=lambda i: i.name):
        importlib.import_module(f"{plugins.__name__}.{info.name}")


_register_plugins()
