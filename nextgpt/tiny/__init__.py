"""Random TINY versions of every backbone NExT-GPT uses, built offline from configs.

Why: the real checkpoints (Vicuna-7B, Stable Diffusion 1.5 / 2.1 / XL, AudioLDM l-full, ZeroScope v2,
ImageBind-huge) can not be downloaded here and are far too big for CPU tests. Each builder below creates
a randomly initialised model of the *same classes* as the real one (LlamaForCausalLM,
StableDiffusionPipeline, StableDiffusionXLPipeline, AudioLDMPipeline, TextToVideoSDPipeline), with real
trained tokenizers, and saves it with ``save_pretrained`` so the project loads it through exactly the
same ``from_pretrained`` code path as the real weights. Every width differs from the others (LLM 64,
SD text 32, CLAP projection 16, T2V text 40, SD 2 text 48, SDXL text 24 + 32 with pooled 20) so that
tests can prove the project reads widths from the loaded configs instead of hard-coding them.

Usage: ``python -m nextgpt.tiny --out DIR [--force]`` (:mod:`nextgpt.tiny.__main__`) or :func:`build_all`.
The synthetic data set these models are tested on is written by :mod:`nextgpt.world.synthetic`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
from collections.abc import Iterator
from pathlib import Path

import torch

# the builders and sizes, as tests and docs refer to them (nextgpt.tiny.SD_TEXT_WIDTH, ...)
from nextgpt.atomic import building, exclusive, install
from nextgpt.encoders.imagebind import ImageBindModel
from nextgpt.encoders.imagebind_config import BRANCHES, ImageBindConfig
from nextgpt.tiny.decoders import (  # noqa: F401
    AUDIOLDM_PROJECTION_DIM,
    AUDIOLDM_TEXT_HIDDEN,
    SD2_TEXT_WIDTH,
    SD_TEXT_WIDTH,
    SDXL_POOLED_WIDTH,
    SDXL_TEXT_WIDTHS,
    SDXL_TIME_EMBED_DIM,
    T2V_TEXT_WIDTH,
    build_tiny_audioldm,
    build_tiny_sd2,
    build_tiny_sdxl,
    build_tiny_stable_diffusion,
    build_tiny_text_to_video,
)
from nextgpt.tiny.llm import LLM_HIDDEN, build_tiny_llm, pretrain_tiny_llm  # noqa: F401
from nextgpt.tiny.tokenizers import (  # noqa: F401
    build_clip_tokenizer,
    build_llm_tokenizer,
    build_roberta_tokenizer,
    learn_bpe,
)

# Bump whenever anything below changes what is written: cached builds with another version are rebuilt.
TINY_BUILD_VERSION: str = (
    "4"  # 3: the tiny LLM is pre-trained on tiny_corpus + caption turns; 4: + SD 2, SDXL
)

MARKER_NAME = ".complete"
IMAGEBIND_FILE = "imagebind_tiny.pth"


# --------------------------------------------------------------------------------------------------------
# All of them, cached
# --------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_progress() -> Iterator[None]:
    """Hide transformers' per-save "Writing model shards" bars during a build, then restore the setting."""
    from transformers.utils import (  # deferred: transformers costs ~1 s; only a build needs it
        logging as hf_logging,
    )

    was_disabled = hf_logging.is_progress_bar_enabled() is False
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if not was_disabled:
            hf_logging.enable_progress_bar()


def _paths(out: Path) -> dict[str, Path]:
    return {
        "llm": out / "llm",
        "sd": out / "sd",
        "sd2": out / "sd2",
        "sdxl": out / "sdxl",
        "audioldm": out / "audioldm",
        "t2v": out / "t2v",
        "imagebind": out / "imagebind" / IMAGEBIND_FILE,
    }


def imagebind_layout_hash() -> str:
    """Short hash of the tiny ImageBind's state-dict layout (names + shapes).

    Why: ``nextgpt/encoders/imagebind.py`` evolves separately from this file; when its tiny layout
    changes, a cached ``imagebind_tiny.pth`` would no longer load, so the cache must be rebuilt.
    Built on the meta device: no memory, and the global RNG is left untouched.
    """
    cfg = tiny_imagebind_config()
    try:
        with torch.device("meta"):
            layout = repr(sorted((k, tuple(v.shape)) for k, v in ImageBindModel(cfg).state_dict().items()))
    except Exception:  # a model that can not be built on meta: fall back to its config
        layout = repr([("config", repr(cfg))])
    return hashlib.sha1(layout.encode()).hexdigest()[:12]


def tiny_imagebind_config() -> ImageBindConfig:
    """The tiny ImageBind with every branch, as ``imagebind_huge.pth`` holds every branch: a model
    config that reads depth maps builds the depth trunk and finds its weights in the same file."""
    return dataclasses.replace(ImageBindConfig.tiny(), modalities=BRANCHES)


def _marker_text() -> str:
    return f"{TINY_BUILD_VERSION}\nimagebind {imagebind_layout_hash()}\n"


def is_complete(out: Path) -> bool:
    """True when `out` holds a finished build of this TINY_BUILD_VERSION and of the current tiny ImageBind.

    The marker's first line is TINY_BUILD_VERSION; the second, the ImageBind layout fingerprint.
    """
    marker = Path(out) / MARKER_NAME
    try:
        lines = marker.read_text(encoding="utf-8").splitlines()
    except OSError:
        return False
    if not lines or lines[0].strip() != TINY_BUILD_VERSION:
        return False
    return f"imagebind {imagebind_layout_hash()}" in (line.strip() for line in lines[1:])


def _build_imagebind(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = ImageBindModel(tiny_imagebind_config())
    torch.save(model.state_dict(), path)


def build_all(out: Path, *, force: bool = False) -> dict[str, Path]:
    """Build every tiny backbone under `out` once (cached by the `.complete` marker) and return their paths.

    The build happens in a temporary folder beside `out` that is renamed into place at the end, so an
    interrupted build never leaves a half cache, and concurrent builders never see one.
    """
    out = Path(out).absolute()
    paths = _paths(out)
    if not force and is_complete(out):
        return paths
    with exclusive(out):
        if not force and is_complete(out):  # another process built it while this one waited
            return paths
        _build_into(out, force)
    return paths


def _build_into(out: Path, force: bool) -> None:
    with building(out) as tmp:
        tmp_paths = _paths(tmp)
        with _quiet_progress():
            build_tiny_llm(tmp_paths["llm"], seed=0)
            build_tiny_stable_diffusion(tmp_paths["sd"], seed=0)
            build_tiny_sd2(tmp_paths["sd2"], seed=0)
            build_tiny_sdxl(tmp_paths["sdxl"], seed=0)
            build_tiny_audioldm(tmp_paths["audioldm"], seed=0)
            build_tiny_text_to_video(tmp_paths["t2v"], seed=0)
            _build_imagebind(tmp_paths["imagebind"], seed=0)
        (tmp / MARKER_NAME).write_text(_marker_text(), encoding="utf-8")
        install(tmp, out, complete=is_complete, force=force)  # a concurrent builder that finished first wins
