"""Folders that appear whole or not at all (nextgpt.atomic), as every folder writer uses them."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from nextgpt.atomic import Busy, building, holding, install, remove_stale
from tests.conftest import REPO_ROOT


def test_a_failed_build_leaves_nothing(tmp_path):
    dest = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with building(dest) as tmp:
            (tmp / "half").write_text("x")
            raise RuntimeError("killed")
    assert not dest.exists() and list(tmp_path.iterdir()) == []


def test_a_finished_result_of_a_concurrent_writer_is_kept(tmp_path):
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "done").write_text("theirs")
    with building(dest) as tmp:
        (tmp / "done").write_text("mine")
        assert install(tmp, dest, complete=lambda d: (d / "done").is_file()) is False
    assert (dest / "done").read_text() == "theirs" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with building(dest) as tmp:  # force: mine replaces theirs, nothing else is left behind
        (tmp / "done").write_text("mine")
        assert install(tmp, dest, complete=lambda d: True, force=True)
    assert (dest / "done").read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_the_previous_result_can_be_kept_as_a_version(tmp_path):
    dest = tmp_path / "stage1"
    dest.mkdir()
    (dest / "w").write_text("old")
    with building(dest) as tmp:
        (tmp / "w").write_text("new")
        install(tmp, dest, keep_old_as=tmp_path / "stage1.v1")
    assert (dest / "w").read_text() == "new" and (tmp_path / "stage1.v1" / "w").read_text() == "old"


def test_concurrent_builders_take_turns(tmp_path):
    """Two processes build the same folder: the second waits for the first and builds nothing."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from nextgpt.atomic import building, exclusive, install
        dest = Path({str(tmp_path / "out")!r})
        with exclusive(dest):
            if (dest / 'done').exists():
                print('found'); sys.exit(0)
            with building(dest) as tmp:
                time.sleep(1.0)
                (tmp / 'done').write_text('x')
                install(tmp, dest)
            print('built')
    """)
    procs = [
        subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) for _ in range(2)
    ]
    outs = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
    assert outs == ["built", "found"], outs


def _child(code: str) -> subprocess.Popen:
    """A Python process running ``code`` that prints "ready" once it holds what it takes."""
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_a_killed_builders_folder_is_removed_by_the_next_builder_and_a_live_ones_kept(tmp_path):
    dest = tmp_path / "stage1"
    code = (
        "import sys, time; from nextgpt.atomic import building\n"
        f"with building({str(dest)!r}, 'writing') as tmp:\n"
        "    (tmp / 'half').write_text('x'); print('ready', flush=True); time.sleep(600)\n"
    )
    killed, alive = _child(code), _child(code)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    try:
        assert len([p for p in tmp_path.glob(".stage1.writing-*") if p.is_dir()]) == 2
        with building(dest, "writing") as tmp:
            (tmp / "w").write_text("mine")
            install(tmp, dest)
        left = sorted(p for p in tmp_path.glob(".stage1.writing-*") if p.is_dir())
        assert len(left) == 1 and (left[0] / "half").is_file()  # the live builder's folder is untouched
    finally:
        alive.kill()
        alive.wait()
    assert remove_stale(dest, "writing") == left  # once its builder is gone too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stage1"]


def test_a_held_lock_names_its_holder_and_dies_with_it(tmp_path):
    lock = tmp_path / "run.lock"
    code = (
        "import time; from nextgpt.atomic import holding\n"
        f"with holding({str(lock)!r}):\n    print('ready', flush=True); time.sleep(600)\n"
    )
    holder = _child(code)
    try:
        with pytest.raises(Busy) as e:
            with holding(lock, wait=False):
                pass
        assert f"pid {holder.pid} on " in e.value.holder
    finally:
        holder.kill()
        holder.wait()
    with holding(lock, wait=False):  # the kernel freed it when the holder died
        pass
