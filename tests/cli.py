"""Running the user's commands as subprocesses: ``python train.py ...`` and torchrun launches."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO_ROOT

ENV = {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true", "TOKENIZERS_PARALLELISM": "false"}


def train(root: Path, cache: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python train.py ARGS`` with every output under ``root`` and the tiny backbones from ``cache``."""
    cmd = [sys.executable, "train.py", *args, f"paths.root={root}", f"paths.cache_dir={cache}", "print_config=false"]
    return subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout, env={**os.environ, **ENV})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bundle_meta(root: Path, stage: int) -> dict:
    return json.loads((root / "bundles" / f"stage{stage}" / "meta.json").read_text())


def recorded_batches(path: Path) -> dict[int, list[str]]:
    """``RecordKeys`` lines as {global step: keys}; a step recorded twice (a crashed step that a
    resumed run repeated) keeps its last record."""
    out: dict[int, list[str]] = {}
    for line in path.read_text().splitlines():
        step, *keys = line.split()
        out[int(step)] = keys
    return out
