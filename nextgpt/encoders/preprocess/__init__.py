"""ImageBind-faithful media preprocessing without torchvision / torchaudio / pytorchvideo.

The NExT-GPT encoder side only sees what ImageBind's ``data.py`` produces, so this module re-creates
those tensors with Pillow, PyAV, soundfile, numpy and torch:

* image: ``Resize(224, bicubic)`` on the PIL image (torchvision size rule: short side 224, long side
  ``int(224 * long / short)``), ``CenterCrop(224)`` (offsets ``int(round((s - 224) / 2))``), /255 and
  CLIP mean/std.
* depth: ImageBind ships no depth loader; :func:`load_depth` follows Omnivore's published recipe
  (metric depth -> disparity = baseline * fx / depth, DepthNorm clamp and /75, the image geometry with
  bilinear resampling, mean 0.0418 / std 0.0295); its docstring says what is Meta's and what is ours.
* audio: float waveform, resampled to 16 kHz with torchaudio's ``sinc_interp_hann`` algorithm
  (re-implemented here in torch), pytorchvideo ``ConstantClipsPerVideoSampler`` clips, per-clip DC
  removal, Kaldi fbank (:func:`kaldi_fbank`), zero-pad/crop to ``target_length`` frames, normalise.
  Only the clips' samples (plus the resampling filter's reach) are read and resampled, so an hour of
  audio costs what three 2 s clips cost; the values are those of a whole-file read and resample.
* video: frames decoded with PyAV, decord-style frame indexing of each sampled clip, pytorchvideo
  ``UniformTemporalSubsample`` + ``ShortSideScale`` (bilinear), CLIP mean/std and ImageBind's
  3-way ``SpatialCrop``. Each wanted frame is decoded from the keyframe before it (a seek), not from
  the start of the file.

Every loader takes a path, raw ``bytes`` or a binary file object (a WebDataset shard member is
decoded from memory, never unpacked to disk). Every unreadable input raises :class:`MediaDecodeError`
naming the file (or, for in-memory data, the ``name=`` given, else the file object's ``.name``, e.g.
``"cc3m-000003.tar:001312382.jpg"``), so data pipelines can skip or report broken samples with one
``except``.
"""

from nextgpt.encoders.preprocess.audio import load_audio
from nextgpt.encoders.preprocess.common import CLIP_MEAN, CLIP_STD, IMAGE_SIZE, MediaDecodeError, MediaSource
from nextgpt.encoders.preprocess.depth import (
    DEPTH_MEAN,
    DEPTH_STD,
    KINECT_BASELINE,
    KINECT_FOCAL_LENGTH,
    load_depth,
)
from nextgpt.encoders.preprocess.image import load_image
from nextgpt.encoders.preprocess.kaldi import kaldi_fbank
from nextgpt.encoders.preprocess.resampling import resample
from nextgpt.encoders.preprocess.video import load_video

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "DEPTH_MEAN",
    "DEPTH_STD",
    "IMAGE_SIZE",
    "KINECT_BASELINE",
    "KINECT_FOCAL_LENGTH",
    "MediaDecodeError",
    "MediaSource",
    "kaldi_fbank",
    "load_audio",
    "load_depth",
    "load_image",
    "load_video",
    "resample",
]
