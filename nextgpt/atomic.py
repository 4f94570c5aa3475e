"""Folders that appear whole or not at all: built in a temporary folder beside their place and
renamed into it (one rename on one file system), so a reader never sees half a folder and a
killed writer leaves only a temporary folder behind. Used by every writer of a folder that others
read while it may be rewritten: the tiny backbones, the synthetic data, stage bundles.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import json
import os
import shutil
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path


@contextlib.contextmanager
def exclusive(dest: str | Path) -> Iterator[None]:
    """Hold an exclusive lock for ``dest`` (POSIX ``flock`` on a file in the system's temp folder,
    named by the folder's absolute path; released when the process dies): concurrent builders of
    the same folder on one machine (test workers, ranks) take turns, so the second finds the first
    one's result instead of building it again. Builders on other machines still race safely
    through ``install``."""
    key = hashlib.sha1(str(Path(dest).absolute()).encode()).hexdigest()[:16]
    with holding(Path(tempfile.gettempdir()) / "nextgpt-locks" / f"{key}.lock"):
        yield


@contextlib.contextmanager
def building(dest: str | Path, tag: str = "building") -> Iterator[Path]:
    """A fresh temporary folder beside ``dest`` to build into; removed if the build fails or the
    folder is never installed (``install`` moves it away on success). A builder holds a lock file
    beside its folder while it builds, so the folders of builders that were killed (their lock
    is free) are removed by the next one."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(dest, tag)
    fd, lock = tempfile.mkstemp(prefix=f".{dest.name}.{tag}-", suffix=".lock", dir=dest.parent)
    fcntl.flock(fd, fcntl.LOCK_EX)
    tmp = Path(lock[: -len(".lock")])
    try:
        tmp.mkdir()
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        Path(lock).unlink(missing_ok=True)
        os.close(fd)


STALE_UNLOCKED_S = 600  # a temporary folder with no lock file (an older writer's) is stale after this


def remove_stale(dest: str | Path, tag: str) -> list[Path]:
    """Remove the temporary folders of killed builders of ``dest`` (their lock is free); returns them."""
    dest = Path(dest)
    removed = []
    for tmp in dest.parent.glob(f".{glob.escape(dest.name)}.{tag}-*"):
        if tmp.suffix == ".lock" or not tmp.is_dir():
            continue
        lock = tmp.with_name(tmp.name + ".lock")
        if not lock.exists():
            if time.time() - tmp.stat().st_mtime < STALE_UNLOCKED_S:
                continue  # a builder between creating its lock and its folder, or an old version's: wait
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
            continue
        try:
            fd = os.open(lock, os.O_RDWR)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # its builder is alive
            os.close(fd)
            continue
        shutil.rmtree(tmp, ignore_errors=True)
        lock.unlink(missing_ok=True)
        os.close(fd)
        removed.append(tmp)
    return removed


class Busy(RuntimeError):
    """A lock another process holds; ``holder`` is what it wrote about itself."""

    def __init__(self, path: Path, holder: str):
        self.path, self.holder = path, holder
        super().__init__(f"{path} is held by {holder}")


def _describe_self() -> str:
    return json.dumps(
        {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "since": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "command": " ".join(sys.argv)[:300],
        }
    )


def holder_of(path: str | Path) -> str:
    """What the process holding ``path`` wrote about itself (host, pid, since, command)."""
    try:
        info = json.loads(Path(path).read_text() or "{}")
    except (OSError, ValueError):
        return "another process"
    if not info:
        return "another process"
    return f"pid {info.get('pid')} on {info.get('host')} since {info.get('since')} ({info.get('command')})"


@contextlib.contextmanager
def holding(
    path: str | Path, *, shared: bool = False, wait: bool = True, on_wait: Callable[[str], None] | None = None
) -> Iterator[None]:
    """Hold a ``flock`` on the file ``path`` (created; its folder too): exclusive, or ``shared``
    with other shared holders. Busy: wait (``on_wait(holder)`` is told who holds it first) or raise
    ``Busy``. An exclusive holder writes who it is into the file. The kernel frees the lock when
    the process dies, so a killed run never leaves a lock behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    try:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = holder_of(path)
            if not wait:
                raise Busy(path, holder) from None
            if on_wait is not None:
                on_wait(holder)
            fcntl.flock(fd, mode)
        if not shared:
            os.ftruncate(fd, 0)
            os.pwrite(fd, _describe_self().encode(), 0)
        yield
    finally:
        os.close(fd)


def install(
    tmp: Path,
    dest: str | Path,
    *,
    complete: Callable[[Path], bool] | None = None,
    force: bool = False,
    keep_old_as: Path | None = None,
) -> bool:
    """Rename the finished folder ``tmp`` to ``dest``; returns whether ``tmp`` is what ``dest`` now is.

    ``complete(dest)``: whether a folder at ``dest`` is already a finished result; a concurrent writer
    that finished first then keeps its result (unless ``force``). An existing ``dest`` is moved aside
    first: to ``keep_old_as`` (a result never silently replaced), else removed after the swap.
    """
    dest = Path(dest)
    trash: Path | None = None
    if dest.exists():
        if complete is not None and not force and complete(dest):
            return False
        trash = keep_old_as or dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(dest, trash)
    try:
        os.replace(tmp, dest)
    except OSError:
        if complete is not None and complete(dest):  # lost a race to a writer that finished
            return False
        raise
    if trash is not None and keep_old_as is None:
        shutil.rmtree(trash, ignore_errors=True)
    return True
