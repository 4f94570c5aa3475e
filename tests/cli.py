"""Running the user's commands as subprocesses: ``python train.py ...`` and torchrun launches."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

ENV = {
    "HF_HUB_OFFLINE": "1",
    "WANDB_MODE": "offline",
    "WANDB_SILENT": "true",
    "TOKENIZERS_PARALLELISM": "false",
}


def train(root: Path, cache: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python train.py ARGS`` with every output under ``root`` and the tiny backbones from ``cache``."""
    cmd = [
        sys.executable,
        "train.py",
        *args,
        f"paths.root={root}",
        f"paths.cache_dir={cache}",
        "print_config=false",
    ]
    return subprocess.run(
        cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout, env={**os.environ, **ENV}
    )


def ok(res: subprocess.CompletedProcess) -> str:
    """The command succeeded; its whole output."""
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    return out


def refused(res: subprocess.CompletedProcess, *needles: str) -> str:
    """The command stopped with exit 2 and a message holding every needle, and no traceback."""
    out = res.stdout + res.stderr
    assert res.returncode == 2, out[-4000:]
    for needle in needles:
        assert needle in out, (needle, out[-3000:])
    assert "Traceback" not in out, out[-3000:]
    return out


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


@contextlib.contextmanager
def served_process(
    args: list[str], ready_url: str, log_path: Path, env: dict[str, str], *, name: str, timeout: float = 180
) -> Iterator[subprocess.Popen]:
    """Start ``python ARGS`` (a server, as a user starts it), wait until ``ready_url`` answers 200,
    yield the process, and stop it afterwards; fail with the server's log when it exits or never
    answers, and when it died while in use."""
    import time
    import urllib.request

    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, *args],
            cwd=REPO_ROOT,
            env={**os.environ, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    pytest.fail(f"the {name} exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
                try:
                    with urllib.request.urlopen(ready_url, timeout=5) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    pytest.fail(f"the {name} did not answer on {ready_url}:\n{log_path.read_text()[-4000:]}")
                time.sleep(0.5)
            yield proc
            assert proc.poll() is None, f"the {name} died during the tests:\n{log_path.read_text()[-4000:]}"
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def shard_dir(root: Path, name: str, shard_set: str = "pairs") -> Path:
    """The folder of a source's shards written by a run under ``root`` (a version named by the
    source's identity, ``datamodules.identity``); the newest when there are several."""
    found = sorted(
        (root / "data" / "shards" / name).rglob(f"{name}-{shard_set}.shards.json"),
        key=lambda p: p.stat().st_mtime_ns,
    )
    assert found, f"no {shard_set} shards of {name!r} under {root / 'data' / 'shards'}"
    return found[-1].parent
