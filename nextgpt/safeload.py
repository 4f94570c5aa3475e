"""Reading checkpoints without running code: tensors and plain data only.

A pickle can call any function while it loads, so a checkpoint from elsewhere could run code on
this machine. Everything this project reads back is therefore loaded with ``weights_only=True``
(PyTorch's restricted unpickler), and the two formats that other libraries unpickle freely are
checked here first with the same kind of allow-list:

- a distributed checkpoint's ``.metadata`` (``torch.distributed.checkpoint`` reads it with plain
  ``pickle.load``; FSDP2 resumes from it): only its own metadata classes, ``torch.Size``, dtypes,
  layouts and paths may appear;
- every ``*.pt`` file of a DeepSpeed checkpoint folder (DeepSpeed loads them with
  ``weights_only=False``): read with ``weights_only=True`` and the few DeepSpeed classes a genuine
  ZeRO checkpoint holds (its stage enum and loss scalers) allowed.

A file that needs anything else is refused with ``UnsafeFileError``, naming the file and the global
it asked for; nothing in it has run.
"""

from __future__ import annotations

import contextlib
import enum
import io
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

DCP_METADATA = ".metadata"
# classes a genuine DeepSpeed ZeRO checkpoint pickles besides tensors and plain data
DEEPSPEED_GLOBALS = (
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
)


class UnsafeFileError(RuntimeError):
    """A file that could only be read by running code it names (arbitrary unpickling)."""

    def __init__(self, path: str | Path, detail: str):
        self.path = Path(path)
        super().__init__(
            f"{path} was refused: reading it needs arbitrary unpickling ({detail}), which could run code from "
            "the file. Checkpoints are read as tensors and plain data only (weights_only=True); if you wrote this "
            "file yourself with another tool, re-save its tensors with torch.save(state_dict) or safetensors"
        )


def _refusal(e: BaseException) -> str | None:
    """The detail of a weights-only refusal, or ``None`` for any other error (a damaged file)."""
    text = str(e)
    if isinstance(e, pickle.UnpicklingError) and ("Weights only load failed" in text or "GLOBAL" in text):
        detail = next((line.strip() for line in text.splitlines() if "GLOBAL" in line), text.splitlines()[0])
        return detail
    return None


@contextlib.contextmanager
def _deepspeed_globals() -> Iterator[None]:
    found = []
    for module, name in DEEPSPEED_GLOBALS:
        try:
            found.append(getattr(__import__(module, fromlist=[name]), name))
        except (ImportError, AttributeError):  # deepspeed absent: no such checkpoint can be genuine
            continue
    with torch.serialization.safe_globals(found):
        yield


def load_checkpoint(path: str | Path, *, mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU; ``UnsafeFileError`` when the file asks
    for more than tensors and plain data."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        detail = _refusal(e)
        if detail is not None:
            raise UnsafeFileError(path, detail) from None
        raise


class _MetadataUnpickler(pickle.Unpickler):
    """Plain ``pickle`` with an allow-list: what ``torch.distributed.checkpoint`` writes in ``.metadata``."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = False
        if module in ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem"):
            obj = super().find_class(module, name)
            allowed = isinstance(obj, type) and (obj.__module__ == module or issubclass(obj, enum.Enum))
        elif module == "torch":
            obj = getattr(torch, name, None)
            allowed = name == "Size" or isinstance(obj, (torch.dtype, torch.layout, torch.memory_format))
        elif (module, name) == ("torch.serialization", "_get_layout"):
            allowed = True
        elif module == "pathlib":
            allowed = name in (
                "Path",
                "PosixPath",
                "WindowsPath",
                "PurePath",
                "PurePosixPath",
                "PureWindowsPath",
            )
        elif module == "collections":
            allowed = name == "OrderedDict"
        if not allowed:
            raise pickle.UnpicklingError(f"Unsupported GLOBAL {module}.{name}")
        return super().find_class(module, name)


def check_dcp_metadata(path: str | Path) -> None:
    """Unpickle a distributed checkpoint's ``.metadata`` with the allow-list before
    ``torch.distributed.checkpoint`` reads it with plain ``pickle``."""
    data = Path(path).read_bytes()
    try:
        _MetadataUnpickler(io.BytesIO(data)).load()
    except pickle.UnpicklingError as e:
        if "GLOBAL" in str(e):
            raise UnsafeFileError(path, str(e)) from None
        raise


def check_checkpoint_folder(path: str | Path) -> None:
    """Every file of a sharded checkpoint folder that some library unpickles: a distributed
    checkpoint's ``.metadata`` and every ``*.pt`` (Lightning's ``meta.pt``, DeepSpeed's states)."""
    path = Path(path)
    for meta in sorted(path.rglob(DCP_METADATA)):
        check_dcp_metadata(meta)
    with _deepspeed_globals():
        for pt in sorted(path.rglob("*.pt")):
            load_checkpoint(pt, mmap=True)
