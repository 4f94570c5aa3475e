"""What every reader of a data file shares: the reason an entry is skipped (:class:`Skip`), and the
checks on the names and text fields it holds (a media name stays inside its folder)."""

from __future__ import annotations

import functools
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import cast

from datamodules.records import Entry, Message
from nextgpt.modality import Modality


class Skip(Exception):
    """An entry that can not be used; its message is the reason counted, ``detail`` (which file,
    which name) only goes into the log line."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.detail = detail

    def describe(self) -> str:
        return f"{self} ({self.detail})" if self.detail else str(self)


OUTSIDE_ROOT = "media path outside the data root"


def media_path(root: str | Path, name: str | Path) -> Path:
    """``root / name`` for a media name read from a data file, refused (:class:`Skip`, reason
    :data:`OUTSIDE_ROOT`) unless it lies inside ``root``.

    Both are resolved first (``..`` and symlinks followed), so an absolute name, a ``..`` that climbs
    out, and a symlink inside the media folder that points outside it are all refused: a data file
    can not make training read, or a shard carry, a file from elsewhere on the machine. A media
    folder that is itself a symlink (``images -> /mnt/big/images``) is fine: the root is resolved
    too. To use files kept elsewhere, link or mount their folder as the media folder, not each file.
    The path returned is the joined one (not the resolved one), so cache keys and log lines keep
    the names the data uses. Every reader of a data file's media names goes through here.
    """
    path = Path(root) / name
    plain = os.fspath(name)
    if "/" not in plain and os.sep not in plain and plain not in ("", ".", ".."):  # a file name: one lstat
        try:
            if not stat.S_ISLNK(os.lstat(path).st_mode):
                return path
        except OSError:  # not there: nothing is read through it (the sample fails as a missing file)
            return path
    base, real = _resolved_root(str(Path(root).absolute())), path.resolve()
    if not real.is_relative_to(base):
        raise Skip(OUTSIDE_ROOT, f"{str(name)!r} is {real}, not inside {base}")
    return path


@functools.lru_cache(maxsize=256)
def _resolved_root(root: str) -> Path:
    return Path(root).resolve()


def _text(entry: Entry | Message, field: str) -> str:
    value = entry.get(field)
    if value is None:
        raise Skip(f"missing {field}")
    if not isinstance(value, str):
        raise Skip(f"{field} is {type(value).__name__}, not a string")
    if not value.strip():
        raise Skip(f"empty {field}")
    return value.strip()


def as_entry(value: object) -> Entry:
    """A JSON value of a data file's list as an entry: it must be an object (:class:`Skip` if not)."""
    if not isinstance(value, dict):
        raise Skip(f"entry is {type(value).__name__}, not an object")
    return cast(Entry, value)


def _media(root: Path | None, mod: Modality, name: str) -> str:
    """The file of a media name, inside the source's media folder; ``root=None``: names of shard
    members (already packed, not files), taken as they are."""
    return name if root is None else str(media_path(root / mod.media_folder, name))


def pair_turns(
    messages: list[Message], answer: Callable[[Message], str] = lambda m: m["value"]
) -> list[tuple[str, str]]:
    """LLaVA-style ``{"from": "human" | "gpt", "value"}`` messages as (human, answer) turns; ``answer``
    gives the text of a gpt message (a reader may append to it)."""
    turns, human = [], None
    for msg in messages:
        if not isinstance(msg, dict) or not isinstance(msg.get("value"), str):
            raise Skip("conversation message is not {from, value: str}")
        role = msg.get("from")
        if role == "human":
            if human is not None:
                raise Skip("two human messages in a row")
            human = msg["value"]
        elif role == "gpt":
            if human is None:
                raise Skip("gpt message without a human message before it")
            turns.append((human, answer(msg)))
            human = None
        else:
            raise Skip(f"unknown speaker {role!r}")
    if not turns:
        raise Skip("no complete human/gpt turn")
    return turns
