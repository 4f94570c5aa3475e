"""Running the user's commands: ``python train.py ...`` (in this process by default, through the
same entry function; as a subprocess where a process is the point) and torchrun launches."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO_ROOT

ENV = {
    "HF_HUB_OFFLINE": "1",
    "WANDB_MODE": "offline",
    "WANDB_SILENT": "true",
    "TOKENIZERS_PARALLELISM": "false",
}


# NEXTGPT_TEST_SUBPROCESS=1 runs every train() as a subprocess (to tell a test's failure from an
# in-process side effect)
ALWAYS_SUBPROCESS = os.environ.get("NEXTGPT_TEST_SUBPROCESS") == "1"


def train(
    root: Path, cache: Path, *args: str, timeout: int = 600, subprocess_: bool = False
) -> subprocess.CompletedProcess:
    """``python train.py ARGS`` with every output under ``root`` and the tiny backbones from ``cache``.

    It runs in this process through ``train.main`` (Hydra, ``main_guard``, the same exit codes and
    output) unless ``subprocess_``: a fresh process costs ~10 s of imports and proves nothing more,
    except where the process is the point (the literal command line, kills, several ranks)."""
    args = (*args, f"paths.root={root}", f"paths.cache_dir={cache}", "print_config=false")
    if subprocess_ or ALWAYS_SUBPROCESS or several_processes(args):
        return subprocess.run(
            [sys.executable, "train.py", *args],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, **ENV},
        )
    return entry_in_process("train.py", list(args), {**os.environ, **ENV})


def several_processes(args: Iterable[str]) -> bool:
    """Does the command start several processes (Lightning's launcher re-executes ``sys.argv``,
    which in a test is pytest's): a multi-device strategy or device count."""
    for arg in args:
        key, _, value = arg.lstrip("+~").partition("=")
        if key == "strategy" and value not in ("auto", "single_device"):
            return True
        if key in ("trainer.devices", "trainer.num_nodes") and value not in ("1", "auto"):
            return True
    return False


def run_python(
    cmd: list[str], env: Mapping[str, str] | None = None, **kwargs: Any
) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, env=env, ...)`` for ``[python, "train.py" | "evaluate.py", *args]``,
    run in this process (:func:`entry_in_process`) unless it starts several processes; any other
    command, or NEXTGPT_TEST_SUBPROCESS=1, runs as the subprocess it names."""
    script, args = (cmd[1], list(cmd[2:])) if len(cmd) > 1 else ("", [])
    if (
        cmd[0] == sys.executable
        and script in ENTRIES
        and not ALWAYS_SUBPROCESS
        and not several_processes(args)
    ):
        res = entry_in_process(script, args, dict(env if env is not None else os.environ))
        if kwargs.get("check") and res.returncode:
            raise subprocess.CalledProcessError(res.returncode, cmd, res.stdout, res.stderr)
        return res
    kwargs.setdefault("cwd", REPO_ROOT)
    return subprocess.run(cmd, env=env, **kwargs)


ENTRIES = ("train.py", "evaluate.py")


def entry_in_process(script: str, args: list[str], env: Mapping[str, str]) -> subprocess.CompletedProcess:
    """``python SCRIPT ARGS`` as ``SCRIPT``'s ``main()`` with ``sys.argv = [SCRIPT, *args]`` and
    ``os.environ = env`` in the repository root, its output captured; exit codes as the command's:
    0, 2 (``main_guard``'s refusals), 1 (an error, with Hydra's traceback). The process state it
    touches (argv, cwd, environment, logging, Hydra's global state) is restored afterwards."""
    import importlib
    import io
    import logging
    import traceback

    from hydra.core.global_hydra import GlobalHydra

    entry = importlib.import_module(script.removesuffix(".py"))

    out, err = io.StringIO(), io.StringIO()
    saved_env, saved_argv, saved_cwd = dict(os.environ), sys.argv, os.getcwd()
    root_logger = logging.getLogger()
    saved_handlers, saved_level = root_logger.handlers[:], root_logger.level
    rc = 0
    try:
        os.environ.clear()
        os.environ.update(env)
        os.chdir(REPO_ROOT)
        sys.argv = [script, *args]
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                entry.main()
            except SystemExit as e:
                rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except BaseException:  # reported as the command would report it
                traceback.print_exc()
                rc = 1
    finally:
        for handler in root_logger.handlers:
            if handler not in saved_handlers:
                handler.close()
        root_logger.handlers[:] = saved_handlers
        root_logger.setLevel(saved_level)
        sys.argv = saved_argv
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        GlobalHydra.instance().clear()
    return subprocess.CompletedProcess([script, *args], rc, out.getvalue(), err.getvalue())


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
    source's identity, ``datamodules.source_files``); the newest when there are several."""
    found = sorted(
        (root / "data" / "shards" / name).rglob(f"{name}-{shard_set}.shards.json"),
        key=lambda p: p.stat().st_mtime_ns,
    )
    assert found, f"no {shard_set} shards of {name!r} under {root / 'data' / 'shards'}"
    return found[-1].parent
