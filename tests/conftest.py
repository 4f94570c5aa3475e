"""Shared fixtures: where the real sample data lives, and skip markers."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


def sample_data_dir() -> Path:
    """The real NExT-GPT sample folder: $NEXTGPT_SAMPLE_DATA, else ../shared/data/nextgpt_sample."""
    env = os.environ.get("NEXTGPT_SAMPLE_DATA")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "data" / "nextgpt_sample"


@pytest.fixture(scope="session")
def sample_root() -> Path:
    root = sample_data_dir()
    if not root.is_dir():
        pytest.skip(f"real sample data not found at {root} (set NEXTGPT_SAMPLE_DATA to a nextgpt_sample-layout folder)")
    return root


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


# --- tiny models and synthetic data, built once per machine (idempotent) ------------------
CACHE_DIR = Path(os.environ.get("NEXTGPT_CACHE", REPO_ROOT / ".cache"))


@pytest.fixture(scope="session")
def tiny_cache() -> Path:
    """Tiny backbones and the synthetic data set under the project cache (built once)."""
    from datamodules.synthetic import write_synthetic
    from nextgpt.tiny import build_all

    build_all(CACHE_DIR / "tiny_backbones")
    write_synthetic(CACHE_DIR / "synthetic", num_per_modality=24, seed=0)
    return CACHE_DIR


@pytest.fixture
def tiny_config(tiny_cache, tmp_path):
    """Compose a config on the tiny model with every output under tmp_path."""
    from nextgpt.config import compose

    def make(*overrides: str):
        return compose(
            [f"paths.root={tmp_path}", f"paths.cache_dir={tiny_cache}", "logger=csv", *overrides],
            output_dir=str(tmp_path / "run"),
        )

    return make
