"""A tiny ImageBind that knows the world: its embeddings of an item say the item's attributes.

The random tiny ImageBind maps every world image to nearly the same point, so nothing downstream
can learn what an image shows. This trains the same model (the same class, the same checkpoint
format and loading path as ``imagebind_huge.pth``) contrastively on world items: each branch's
embedding of an item (vision for images and videos, audio for tones) is pulled towards the
embedding of the item's caption by a small bag-of-words caption encoder, and away from other
captions (supervised InfoNCE: items with the same caption are all positives). The caption encoder
is shared, so the branches meet in one space through the words (a red square and a red circle
share "red"). It stands in for ImageBind's text branch, which this project does not build, and is
saved beside the checkpoint only for the retrieval figures.

Quality line, per branch: top-1 retrieval of the true caption among the distinct captions of
held-out items (a seed no training set uses), and the same for a random model.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from nextgpt import modality as modality_registry
from nextgpt.encoders.imagebind import ImageBindModel
from nextgpt.world.synthetic import CAPTION_VOCABULARY, MEDIA_DIRS, dataset_name, write_synthetic

log = logging.getLogger(__name__)

BRANCH = {
    "image": "vision",
    "video": "vision",
    "audio": "audio",
}  # the ImageBind branch a world modality goes through
_WORD = re.compile(r"[A-Za-z]+")


@dataclass(frozen=True)
class WorldImageBindSettings:
    """How much world the trainer sees and how long it trains (the defaults fit the build budget
    on 2 CPU cores; ``small`` is for tests)."""

    items: Sequence[int] = (384, 192, 160)  # image, audio, video items to train on
    heldout: int = 64  # items per modality for the retrieval figures
    steps: int = 360
    batch: int = 32
    video_clips: int = 3  # clips per video kept in memory (evenly spaced; inference averages all of them)
    lr: float = 2e-3
    seed: int = 0
    train_seed: int = 7  # the world items it trains on (the stage data use 0, the benchmarks 1000)
    heldout_seed: int = 1001

    @classmethod
    def small(cls) -> WorldImageBindSettings:
        # what the learning test (tests/integration/test_learning.py) needs for a short stage 1 to
        # caption above chance: audio and video retrieval well above chance, in about 25 s
        return cls(items=(96, 192, 32), heldout=24, steps=300, batch=32, video_clips=2)


class CaptionEncoder(nn.Module):
    """Mean of word embeddings -> linear: the text side of the contrastive objective."""

    def __init__(self, dim: int, width: int = 64):
        super().__init__()
        self.vocab = {w: i + 1 for i, w in enumerate(sorted({w.lower() for w in CAPTION_VOCABULARY}))}
        self.embed = nn.EmbeddingBag(len(self.vocab) + 1, width, mode="mean", padding_idx=0)
        self.proj = nn.Linear(width, dim)

    def ids(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [[self.vocab.get(w.lower(), 0) for w in _WORD.findall(c)] or [0] for c in captions]
        offsets = torch.tensor([0] + [len(r) for r in rows[:-1]]).cumsum(0)
        return torch.tensor([i for r in rows for i in r]), offsets

    def forward(self, captions: Sequence[str]) -> torch.Tensor:
        ids, offsets = self.ids(captions)
        return F.normalize(self.proj(self.embed(ids, offsets)), dim=-1)


@dataclass
class Items:
    inputs: torch.Tensor  # ImageBind inputs, one row per item (video/audio: (clips, ...))
    captions: list[str]


def _load_items(root: Path, modality: str, limit: int, clips: int | None) -> Items:
    """The written items of one modality as ImageBind inputs (the project's own preprocessing)."""
    folder = root / dataset_name(modality)
    entries = json.loads((folder / f"{dataset_name(modality)}.json").read_text())[:limit]
    mod = modality_registry.get(modality)
    rows, captions = [], []
    for e in tqdm(entries, desc=f"world ImageBind: reading {modality}", unit="item", leave=False):
        x = mod.load(str(folder / MEDIA_DIRS[modality] / e[f"{modality}_name"]))
        if clips is not None and x.ndim >= 4 and x.shape[0] > clips:  # a clip axis: keep evenly spaced clips
            x = x[np.linspace(0, x.shape[0] - 1, clips).round().astype(int)]
        rows.append(x.half())
        captions.append(e["caption"])
    return Items(torch.stack(rows), captions)


def _embed(model: ImageBindModel, modality: str, x: torch.Tensor) -> torch.Tensor:
    return F.normalize(model.encode(BRANCH[modality], x.float()), dim=-1)


def _loss(
    media: torch.Tensor, text: torch.Tensor, captions: Sequence[str], temperature: float = 0.1
) -> torch.Tensor:
    same = torch.tensor([[a == b for b in captions] for a in captions], dtype=torch.float32)
    target = same / same.sum(1, keepdim=True)
    logits = media @ text.T / temperature
    return 0.5 * (
        torch.sum(-target * logits.log_softmax(1), 1).mean()
        + torch.sum(-target * logits.log_softmax(0).T, 1).mean()
    )


@torch.no_grad()
def retrieval(
    model: ImageBindModel, captions_model: CaptionEncoder, items: Items, modality: str, batch: int = 32
) -> float:
    """Top-1 retrieval of each item's caption among the distinct captions of ``items``."""
    model.eval()
    distinct = sorted(set(items.captions))
    text = captions_model(distinct)
    media = torch.cat(
        [_embed(model, modality, items.inputs[i : i + batch]) for i in range(0, len(items.captions), batch)]
    )
    best = (media @ text.T).argmax(1)
    return float(np.mean([distinct[int(k)] == c for k, c in zip(best, items.captions, strict=False)]))


def train_world_imagebind(
    model: ImageBindModel,
    settings: WorldImageBindSettings = WorldImageBindSettings(),
    work: Path | None = None,
) -> dict:
    """Train ``model`` (in place) on world items; returns the quality report (retrieval before and after)."""
    torch.manual_seed(settings.seed)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="world-imagebind-", dir=work) as tmp_dir:
        tmp = Path(tmp_dir)
        write_synthetic(tmp / "train", num_per_modality=max(settings.items), seed=settings.train_seed)
        write_synthetic(tmp / "heldout", num_per_modality=settings.heldout, seed=settings.heldout_seed)
        train = {
            m: _load_items(tmp / "train", m, n, settings.video_clips)
            for m, n in zip(("image", "audio", "video"), settings.items, strict=False)
        }
        heldout = {
            m: _load_items(tmp / "heldout", m, settings.heldout, None) for m in ("image", "audio", "video")
        }
    text = CaptionEncoder(model.embed_dim)
    before = {m: retrieval(model, text, heldout[m], m) for m in heldout}
    params = [p for p in model.parameters() if p.requires_grad] + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=settings.lr, total_steps=settings.steps, pct_start=0.1
    )
    order = ["image", "audio", "video"]
    rng = np.random.default_rng(settings.seed)
    losses = []
    bar = tqdm(range(settings.steps), desc="world ImageBind: training", unit="step")
    model.train()
    for step in bar:
        m = order[step % len(order)]
        data = train[m]
        size = settings.batch // 2 if m == "video" else settings.batch
        idx = rng.choice(len(data.captions), size=min(size, len(data.captions)), replace=False)
        captions = [data.captions[i] for i in idx]
        loss = _loss(_embed(model, m, data.inputs[idx]), text(captions), captions)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-12:]):.3f}")
    model.eval()
    after = {m: retrieval(model, text, heldout[m], m) for m in heldout}
    chance = {m: 1.0 / len(set(heldout[m].captions)) for m in heldout}
    report = {
        "retrieval_top1": after,
        "random_model_top1": before,
        "chance": chance,
        "steps": settings.steps,
        "final_loss": float(np.mean(losses[-12:])),
        "seconds": round(time.perf_counter() - start, 1),
        "heldout_items": settings.heldout,
        "trained_items": dict(zip(order, settings.items, strict=False)),
    }
    log.info(
        "world ImageBind: top-1 caption retrieval on held-out items %s (random model %s, chance %s) in %.0f s",
        {m: round(v, 3) for m, v in after.items()},
        {m: round(v, 3) for m, v in before.items()},
        {m: round(v, 3) for m, v in chance.items()},
        report["seconds"],
    )
    return report
