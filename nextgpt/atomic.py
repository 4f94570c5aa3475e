"""Folders that appear whole or not at all: built in a temporary folder beside their place and
renamed into it (one rename on one file system), so a reader never sees half a folder and a
killed writer leaves only a temporary folder behind. Used by every writer of a folder that others
read while it may be rewritten: the tiny backbones, the synthetic data, stage bundles.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
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
    import fcntl
    import hashlib

    key = hashlib.sha1(str(Path(dest).absolute()).encode()).hexdigest()[:16]
    locks = Path(tempfile.gettempdir()) / "nextgpt-locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{key}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def building(dest: str | Path, tag: str = "building") -> Iterator[Path]:
    """A fresh temporary folder beside ``dest`` to build into; removed if the build fails or the
    folder is never installed (``install`` moves it away on success)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.{tag}-", dir=dest.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def install(tmp: Path, dest: str | Path, *, complete: Callable[[Path], bool] | None = None, force: bool = False,
            keep_old_as: Path | None = None) -> bool:
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
