"""Alignment targets: each caption's embedding by its decoder's own frozen text encoder.

Read from memory-mapped disk caches (``python -m nextgpt.cache``, or those a JSON-layout run
completes at its start); a caption not cached yet is encoded (all of a batch's new captions in one
call) and written to the cache through a bounded buffer, so no per-caption tensor piles up in
process memory over an epoch: at most ``buffer_rows`` embeddings per modality wait in memory
before they become a part of the store (this process's own part: ranks never write one file).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from nextgpt.cache.store import FeatureStore, caption_key
from nextgpt.decoders import TextConditioner


@runtime_checkable
class CaptionSources(Protocol):
    """A data module whose sources have caption caches: it attaches them to the stage's targets at
    the start of a fit (``datamodules/``: beside the JSON files, or beside the shards)."""

    def open_caption_stores(
        self,
        targets: CaptionTargets,
        *,
        device: torch.device | str,
        is_global_zero: bool = True,
        barrier: Callable[[], None] = lambda: None,
    ) -> None: ...


class CaptionTargets:
    def __init__(
        self,
        conditioners: Mapping[str, TextConditioner],
        spill: str | Path,
        *,
        buffer_rows: int = 4096,
        batch_size: int = 64,
        dtype: str = "float16",
    ):
        """``spill``: where new embeddings of a modality go when no store of it is attached."""
        self.conditioners = dict(conditioners)
        self.spill = Path(spill)
        self.buffer_rows, self.batch_size, self.dtype = int(buffer_rows), int(batch_size), dtype
        self.stores: dict[str, list[FeatureStore]] = {}
        self.pending: dict[str, dict[str, np.ndarray]] = {}  # modality -> caption key -> row, not yet on disk
        self.computed = 0

    def attach(self, modality: str, store: FeatureStore) -> None:
        """Read ``store`` too; the first store attached for a modality receives its new embeddings."""
        self.stores.setdefault(modality, []).append(store)

    def _writer(self, modality: str) -> FeatureStore:
        if not self.stores.get(modality):
            conditioner = self.conditioners[modality]
            self.attach(modality, FeatureStore.at(self.spill, f"text_{modality}", conditioner.fingerprint()))
        return self.stores[modality][0]

    def _find(self, modality: str, key: str) -> np.ndarray | None:
        row = self.pending.get(modality, {}).get(key)
        if row is not None:
            return row
        for store in self.stores.get(modality, ()):
            if key in store:
                return store.get(key)
        return None

    def _found(self, modality: str, key: str) -> np.ndarray:
        row = self._find(modality, key)
        if row is None:  # get computes every caption it does not find first
            raise KeyError(f"no {modality} embedding of caption {key}")
        return row

    @torch.no_grad()
    def get(self, captions: Mapping[str, list[str]], device: torch.device | str) -> dict[str, torch.Tensor]:
        """modality -> (len(captions), seq, width) float32 targets, in the given order."""
        out = {}
        for name, caps in captions.items():
            if not caps:
                continue
            keys = [caption_key(c) for c in caps]
            new = {k: c for k, c in zip(keys, caps, strict=False) if self._find(name, k) is None}
            if new:
                self._compute(name, new, device)
            out[name] = torch.from_numpy(np.stack([self._found(name, k) for k in keys]).astype(np.float32))
        return out

    def _compute(self, name: str, captions: Mapping[str, str], device) -> None:
        conditioner = self.conditioners[name].to(device)
        items = list(captions.items())
        pending = self.pending.setdefault(name, {})
        for i in range(0, len(items), self.batch_size):
            chunk = items[i : i + self.batch_size]
            rows = conditioner.encode([c for _, c in chunk]).float().cpu().numpy().astype(self.dtype)
            pending.update({k: row for (k, _), row in zip(chunk, rows, strict=False)})
        self.computed += len(items)
        if len(pending) >= self.buffer_rows:
            self.flush(name)

    def flush(self, modality: str | None = None) -> None:
        """Write the buffered embeddings (of one modality, or all) as a part of this process's."""
        for name in [modality] if modality else list(self.pending):
            pending = self.pending.get(name)
            if pending:
                store = self._writer(name)
                store.add(
                    list(pending),
                    np.stack(list(pending.values())),
                    f"{self.conditioners[name].conditioning} of {self.conditioners[name].path}",
                )
                self.pending[name] = {}

    def refresh(self) -> None:
        """See what other processes wrote since."""
        for stores in self.stores.values():
            for store in stores:
                store.refresh()

    @property
    def buffered(self) -> int:
        return sum(len(p) for p in self.pending.values())
