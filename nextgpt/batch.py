"""What the data side hands the model: items, batches and the collator contract.

One neutral module shared by the training data modules (``datamodules/``), inference
(:mod:`nextgpt.generate`) and evaluation, so a batch is built the same way everywhere and the
library never reaches into the data pipeline. A sample is tokenised with its media slots and
signal groups (:func:`nextgpt.prompts.encode_conversation`); an unreadable sample becomes a
:class:`Skipped` with the reason the run's data report counts.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, cast

import torch
from torch.utils.data import Dataset

from nextgpt import modality as modality_registry
from nextgpt.encoders.preprocess import MediaDecodeError
from nextgpt.prompts import IGNORE_INDEX, Conversation, encode_conversation, get_template

log = logging.getLogger(__name__)


@dataclass
class Item:
    key: str
    input_ids: list[int]
    labels: list[int]
    media: list[tuple[str, torch.Tensor, bool]]  # (modality, tensor, is a cached feature) in slot order
    slot_starts: list[int]
    captions_out: list[tuple[str, str]]  # in signal-group order
    truncated: bool
    targets: list[torch.Tensor | None] | None = (
        None  # denoising-loss target media per signal group (None: none)
    )


class Skipped(NamedTuple):
    """A sample that could not be used, and why (the counter key of the run's data report)."""

    key: str
    reason: str


def skip_reason(error: Exception) -> str:
    if isinstance(error, FileNotFoundError) or "does not exist" in getattr(error, "reason", ""):
        return "missing media file"
    if isinstance(error, MediaDecodeError):
        return "empty media file" if "empty" in error.reason else "undecodable media"
    return "unusable sample"


class ConversationDataset(Dataset):
    """Decodes a conversation's media and tokenises it; ``None`` when a media file is unreadable."""

    def __init__(
        self,
        conversations: Sequence[Conversation],
        tokenizer,
        layout,
        template: str,
        num_media_tokens: int,
        max_length: int,
        features: Mapping[str, tuple[Any, str]] | None = None,
        denoise_targets: Mapping[str, Mapping[str, Any]] | None = None,
    ):
        self.conversations = list(conversations)
        self.denoise_targets = dict(denoise_targets or {})  # modality -> decoder generation settings
        self.features = dict(features or {})  # media path -> (FeatureStore, key): cached ImageBind features
        self.tokenizer, self.layout, self.template = tokenizer, layout, get_template(template)
        self.num_media_tokens, self.max_length = num_media_tokens, max_length
        self.slot_id = tokenizer.pad_token_id

    def __len__(self) -> int:
        return len(self.conversations)

    def __getitem__(self, index: int) -> Item | Skipped:
        conv = self.conversations[index]
        try:
            return self.build_item(conv, self.load_input)
        except (ValueError, OSError, RuntimeError) as e:  # MediaDecodeError is a ValueError
            log.warning("skipped sample %r: %s", conv.key, e)
            return Skipped(conv.key, skip_reason(e))

    def load_input(self, name: str, path: str) -> tuple[torch.Tensor, bool]:
        """(tensor, is a cached feature) for one input media file."""
        if path in self.features:
            store, key = self.features[path]
            if key in store.failed:
                raise ValueError(store.failed[key])
            return torch.from_numpy(store.get(key)).float(), True
        return modality_registry.get(name).load(path), False

    def build_item(self, conv: Conversation, load) -> Item:
        """Tokenise ``conv`` and read its input media with ``load(modality, path) -> (tensor, cached)``;
        the shard pipeline passes a loader that reads tar members instead of files."""
        enc = encode_conversation(
            conv,
            self.tokenizer,
            self.layout,
            self.template,
            num_media_tokens=self.num_media_tokens,
            max_length=self.max_length,
            slot_id=self.slot_id,
        )
        media = [(name, *load(name, conv.media_in[i][1])) for _, name, i in enc.media_slots]
        captions = [conv.captions_out[i] for _, _, i in enc.signal_groups]
        targets = [self._target(conv, i) for _, _, i in enc.signal_groups]
        return Item(
            conv.key,
            enc.input_ids,
            enc.labels,
            media,
            [s for s, _, _ in enc.media_slots],
            captions,
            enc.truncated,
            targets,
        )

    def _target(self, conv: Conversation, index: int) -> torch.Tensor | None:
        """The output group's target media for the denoising loss, when wanted and readable."""
        name = conv.captions_out[index][0]
        if name not in self.denoise_targets or index >= len(conv.media_out) or not conv.media_out[index][1]:
            return None
        try:
            return modality_registry.get(name).load_target(
                conv.media_out[index][1], self.denoise_targets[name]
            )
        except (ValueError, OSError) as e:
            log.warning("no denoising target for sample %r: %s", conv.key, e)
            return None


class Collator:
    """Right-pads a list of ``Item``s and gathers media and output captions in sequence order.

    ``counts`` says what the batch's loss terms sum over (label tokens, output groups per
    modality, denoising targets per modality): a step normalises by their totals over all its
    micro-batches and ranks. A batch whose every sample was unreadable becomes one padding row
    with nothing to learn, never ``None``: every rank still runs the same step, so none waits
    for another in a collective.

    ``pack_length``: pack several samples into each row of at most that many tokens (:meth:`rows`)
    instead of one sample per row. Each sample's ``position_ids`` restart at 0 and the
    batch has no ``attention_mask``: transformers then keeps attention within each sample (a
    block-diagonal causal mask; the varlen kernel under flash_attention_2). Labels, media slots and
    signal groups stay with their sample; the first token of a sample is never a target, as in
    its own row.
    """

    def __init__(self, pad_id: int, num_media_tokens: int, pack_length: int | None = None):
        self.pad_id, self.num_media_tokens, self.pack_length = pad_id, num_media_tokens, pack_length

    def rows(self, items: Sequence[Item]) -> list[list[Item]]:
        """One row per item, or (packing) as few rows of at most ``pack_length`` tokens as the
        items need, filled evenly (longest first into the emptiest row that has room) so that the
        rows, padded to the longest, waste little; each row keeps its items in their given order."""
        if not self.pack_length:
            return [[it] for it in items]
        lengths = [len(it.input_ids) for it in items]
        wanted = max(1, -(-sum(lengths) // self.pack_length))  # ceil(total / pack_length)
        fill = [0] * wanted
        members: list[list[int]] = [[] for _ in range(wanted)]
        for k in sorted(range(len(items)), key=lambda k: -lengths[k]):
            fits = [r for r in range(len(fill)) if fill[r] + lengths[k] <= max(self.pack_length, lengths[k])]
            if not fits:
                fill.append(0)
                members.append([])
                fits = [len(fill) - 1]
            r = min(fits, key=lambda r: fill[r])
            fill[r] += lengths[k]
            members[r].append(k)
        return [[items[k] for k in sorted(m)] for m in members if m]

    def __call__(self, items: Sequence[Item | Skipped | None]) -> dict[str, Any]:
        good = [it for it in items if isinstance(it, Item)]
        reasons = Counter(
            it.reason if isinstance(it, Skipped) else "unusable sample"
            for it in items
            if not isinstance(it, Item)
        )
        if not good:
            return {**self.empty(len(items)), "skipped_by_reason": dict(reasons)}
        rows = self.rows(good)
        length = max(sum(len(it.input_ids) for it in row) for row in rows)
        b = len(rows)
        input_ids = torch.full((b, length), self.pad_id, dtype=torch.long)
        labels = torch.full((b, length), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((b, length), dtype=torch.long)
        positions = torch.zeros((b, length), dtype=torch.long)
        media_mask = torch.zeros((b, length), dtype=torch.bool)
        media: dict[str, list[torch.Tensor]] = {}
        features: dict[str, list[torch.Tensor]] = {}
        sequence: list[tuple[str, int, bool]] = []
        captions: dict[str, list[str]] = {}
        targets: dict[str, list[torch.Tensor | None]] = {}
        keys = []
        for r, row in enumerate(rows):
            offset = 0
            for it in row:
                n = len(it.input_ids)
                input_ids[r, offset : offset + n] = torch.tensor(it.input_ids)
                labels[r, offset : offset + n] = torch.tensor(it.labels)
                labels[r, offset] = IGNORE_INDEX  # nothing before it in its own row predicts it
                attention[r, offset : offset + n] = 1
                positions[r, offset : offset + n] = torch.arange(n)
                for start, (name, tensor, cached) in zip(it.slot_starts, it.media, strict=False):
                    media_mask[r, offset + start : offset + start + self.num_media_tokens] = True
                    store = features if cached else media
                    sequence.append((name, len(store.setdefault(name, [])), cached))
                    store[name].append(tensor)
                for (name, caption), target in zip(
                    it.captions_out, it.targets or [None] * len(it.captions_out), strict=False
                ):
                    captions.setdefault(name, []).append(caption)
                    targets.setdefault(name, []).append(target)
                keys.append(it.key)
                offset += n
            positions[r, offset:] = torch.arange(length - offset)  # the padding: a segment of its own
        output_media = {
            n: torch.stack(cast(list[torch.Tensor], ts))  # every one present (the condition)
            for n, ts in targets.items()
            if ts and all(t is not None for t in ts)
        }
        counts = {"tokens": int((labels[:, 1:] != IGNORE_INDEX).sum())}
        counts.update({f"align/{n}": len(c) for n, c in captions.items()})
        counts.update({f"denoise/{n}": int(t.shape[0]) for n, t in output_media.items()})
        packed = (
            {"attention_mask": None, "position_ids": positions}
            if self.pack_length
            else {"attention_mask": attention}
        )
        return {
            "keys": keys,
            "input_ids": input_ids,
            "labels": labels,
            **packed,
            "media_mask": media_mask,
            "media": {name: torch.stack(ts) for name, ts in media.items()},
            "media_features": {name: torch.stack(ts) for name, ts in features.items()},
            "media_sequence": sequence,
            "output_captions": captions,
            # target media per modality, only where every group of that modality in the batch has one
            "output_media": output_media,
            "counts": counts,
            "num_skipped": len(items) - len(good),
            "skipped_by_reason": dict(reasons),
            "num_truncated": sum(it.truncated for it in good),
            "media_from_cache": sum(len(v) for v in features.values()),
            "media_decoded": sum(len(v) for v in media.values()),
            "padding": float(1.0 - attention.float().mean()),  # the batch's fraction of padding tokens
        }

    def empty(self, num_skipped: int) -> dict[str, Any]:
        """One padding token, no label, no media: the step runs and learns nothing from it."""
        return {
            "keys": [],
            "input_ids": torch.full((1, 1), self.pad_id, dtype=torch.long),
            "labels": torch.full((1, 1), IGNORE_INDEX, dtype=torch.long),
            "attention_mask": torch.ones((1, 1), dtype=torch.long),
            "media_mask": torch.zeros((1, 1), dtype=torch.bool),
            "media": {},
            "media_features": {},
            "media_sequence": [],
            "output_captions": {},
            "output_media": {},
            "counts": {"tokens": 0},
            "num_skipped": num_skipped,
            "skipped_by_reason": {},
            "num_truncated": 0,
        }


def collate_conversations(
    conversations: Sequence[Conversation],
    tokenizer,
    layout,
    template: str,
    *,
    num_media_tokens: int,
    max_length: int,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """One batch of ``conversations`` built exactly as training builds it, on ``device``.

    For inference and evaluation: an unreadable media file raises (naming the file) instead of
    being skipped, since the caller asked for that sample."""
    ds = ConversationDataset(conversations, tokenizer, layout, template, num_media_tokens, max_length)
    batch = Collator(tokenizer.pad_token_id, num_media_tokens)(
        [ds.build_item(c, ds.load_input) for c in conversations]
    )
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            batch[key] = value.to(device)
        elif isinstance(value, dict):
            batch[key] = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in value.items()}
    return batch
