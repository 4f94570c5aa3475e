"""Depth maps, an input-only modality: read through ImageBind's depth branch (Meta's ``depth_stem``
trunk, in ``imagebind_huge.pth``), never generated (no decoder, no signal tokens).

In a dataset: ``<root>/depths/<file>`` with ``depth_name`` / ``input_depth`` fields in the
NExT-GPT JSON files, ``<depth>`` placeholders in conversations (``configs/dataset/depth.yaml``).
In the model: ``+model.modalities.depth={num_signal_tokens: 0, decoder: null}``. Preprocessing:
:func:`nextgpt.encoders.preprocess.load_depth` (metric depth -> disparity -> DepthNorm, as Omnivore).
"""

from __future__ import annotations

from pathlib import Path

import torch

from nextgpt.encoders.preprocess import load_depth
from nextgpt.modality import Modality, register


def _load_depth(path: Path) -> torch.Tensor:
    return load_depth(path)


DEPTH = register(
    Modality(
        name="depth",
        tag="Dep",
        signal_prefix="DEP",
        default_num_signal_tokens=0,
        encoder_modality="depth",
        media_folder="depths",
        extensions=(".png", ".npy", ".tif", ".tiff"),
        output_suffix="",
        pipeline_output="",
        loader=_load_depth,
    )
)
