"""The DataModule of all three stages: NExT-GPT-layout sources -> tokenised, collated batches.

Media are decoded and tokenised in the dataloader workers; an unreadable sample is skipped
(returned as ``None``), named in the log and counted in the batch (``num_skipped``).
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from datamodules.nextgpt_layout import read_source
from datamodules.steps import EpochProgress, StepSampler, StepWindows
from nextgpt import modality as modality_registry
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
    targets: list[torch.Tensor | None] = None  # denoising-loss target media per signal group (None: none)


class Skipped(NamedTuple):
    """A sample that could not be used, and why (the counter key of the run's data report)."""

    key: str
    reason: str


def skip_reason(error: Exception) -> str:
    from nextgpt.encoders.preprocess import MediaDecodeError

    if isinstance(error, FileNotFoundError) or "does not exist" in getattr(error, "reason", ""):
        return "missing media file"
    if isinstance(error, MediaDecodeError):
        return "empty media file" if "empty" in error.reason else "undecodable media"
    return "unusable sample"


class ConversationDataset(Dataset):
    """Decodes a conversation's media and tokenises it; ``None`` when a media file is unreadable."""

    def __init__(self, conversations: Sequence[Conversation], tokenizer, layout, template: str,
                 num_media_tokens: int, max_length: int, features: Mapping[str, tuple[Any, str]] | None = None,
                 denoise_targets: Mapping[str, Mapping[str, Any]] | None = None):
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
            conv, self.tokenizer, self.layout, self.template,
            num_media_tokens=self.num_media_tokens, max_length=self.max_length, slot_id=self.slot_id,
        )
        media = [(name, *load(name, conv.media_in[i][1])) for _, name, i in enc.media_slots]
        captions = [conv.captions_out[i] for _, _, i in enc.signal_groups]
        targets = [self._target(conv, i) for _, _, i in enc.signal_groups]
        return Item(conv.key, enc.input_ids, enc.labels, media, [s for s, _, _ in enc.media_slots], captions,
                    enc.truncated, targets)

    def _target(self, conv: Conversation, index: int) -> torch.Tensor | None:
        """The output group's target media for the denoising loss, when wanted and readable."""
        name = conv.captions_out[index][0]
        if name not in self.denoise_targets or index >= len(conv.media_out) or not conv.media_out[index][1]:
            return None
        try:
            return modality_registry.get(name).load_target(conv.media_out[index][1], self.denoise_targets[name])
        except (ValueError, OSError) as e:
            log.warning("no denoising target for sample %r: %s", conv.key, e)
            return None


class Collator:
    """Right-pads a list of ``Item``s and gathers media and output captions in sequence order.

    ``counts`` says what the batch's loss terms sum over (label tokens, output groups per
    modality, denoising targets per modality): a step normalises by their totals over all its
    micro-batches and ranks. A batch whose every sample was unreadable becomes one padding row
    with nothing to learn, never ``None``: every rank still runs the same step, so none waits
    for another in a collective."""

    def __init__(self, pad_id: int, num_media_tokens: int):
        self.pad_id, self.num_media_tokens = pad_id, num_media_tokens

    def __call__(self, items: Sequence[Item | Skipped | None]) -> dict[str, Any]:
        good = [it for it in items if isinstance(it, Item)]
        reasons = Counter(it.reason if isinstance(it, Skipped) else "unusable sample" for it in items
                          if not isinstance(it, Item))
        if not good:
            return {**self.empty(len(items)), "skipped_by_reason": dict(reasons)}
        length = max(len(it.input_ids) for it in good)
        b = len(good)
        input_ids = torch.full((b, length), self.pad_id, dtype=torch.long)
        labels = torch.full((b, length), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((b, length), dtype=torch.long)
        media_mask = torch.zeros((b, length), dtype=torch.bool)
        media: dict[str, list[torch.Tensor]] = {}
        features: dict[str, list[torch.Tensor]] = {}
        sequence: list[tuple[str, int, bool]] = []
        captions: dict[str, list[str]] = {}
        targets: dict[str, list[torch.Tensor | None]] = {}
        for row, it in enumerate(good):
            n = len(it.input_ids)
            input_ids[row, :n] = torch.tensor(it.input_ids)
            labels[row, :n] = torch.tensor(it.labels)
            attention[row, :n] = 1
            for start, (name, tensor, cached) in zip(it.slot_starts, it.media):
                media_mask[row, start : start + self.num_media_tokens] = True
                target = features if cached else media
                sequence.append((name, len(target.setdefault(name, [])), cached))
                target[name].append(tensor)
            for (name, caption), target in zip(it.captions_out, it.targets or [None] * len(it.captions_out)):
                captions.setdefault(name, []).append(caption)
                targets.setdefault(name, []).append(target)
        output_media = {n: torch.stack(ts) for n, ts in targets.items() if ts and all(t is not None for t in ts)}
        counts = {"tokens": int((labels[:, 1:] != IGNORE_INDEX).sum())}
        counts.update({f"align/{n}": len(c) for n, c in captions.items()})
        counts.update({f"denoise/{n}": int(t.shape[0]) for n, t in output_media.items()})
        return {
            "keys": [it.key for it in good],
            "input_ids": input_ids,
            "labels": labels,
            "attention_mask": attention,
            "media_mask": media_mask,
            "media": {name: torch.stack(ts) for name, ts in media.items()},
            "media_features": {name: torch.stack(ts) for name, ts in features.items()},
            "media_sequence": sequence,
            "output_captions": captions,
            # target media per modality, only where every group of that modality in the batch has one
            "output_media": output_media,
            "counts": counts,
            "num_skipped": len(items) - b,
            "skipped_by_reason": dict(reasons),
            "num_truncated": sum(it.truncated for it in good),
            "media_from_cache": sum(len(v) for v in features.values()),
            "media_decoded": sum(len(v) for v in media.values()),
        }

    def empty(self, num_skipped: int) -> dict[str, Any]:
        """One padding token, no label, no media: the step runs and learns nothing from it."""
        return {
            "keys": [], "input_ids": torch.full((1, 1), self.pad_id, dtype=torch.long),
            "labels": torch.full((1, 1), IGNORE_INDEX, dtype=torch.long),
            "attention_mask": torch.ones((1, 1), dtype=torch.long), "media_mask": torch.zeros((1, 1), dtype=torch.bool),
            "media": {}, "media_features": {}, "media_sequence": [], "output_captions": {}, "output_media": {},
            "counts": {"tokens": 0}, "num_skipped": num_skipped, "skipped_by_reason": {}, "num_truncated": 0,
        }


def collate_conversations(conversations: Sequence[Conversation], tokenizer, layout, template: str, *,
                          num_media_tokens: int, max_length: int, device: str | torch.device = "cpu") -> dict[str, Any]:
    """One batch of ``conversations`` built exactly as training builds it, on ``device``.

    For inference and evaluation: an unreadable media file raises (naming the file) instead of
    being skipped, since the caller asked for that sample."""
    ds = ConversationDataset(conversations, tokenizer, layout, template, num_media_tokens, max_length)
    batch = Collator(tokenizer.pad_token_id, num_media_tokens)([ds.build_item(c, ds.load_input) for c in conversations])
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            batch[key] = value.to(device)
        elif isinstance(value, dict):
            batch[key] = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in value.items()}
    return batch


def trainer_topology(trainer) -> tuple[int, int, int]:
    """(global rank, world size, accumulate_grad_batches) of ``trainer``; one process without one."""
    if trainer is None:
        return 0, 1, 1
    return int(trainer.global_rank), int(trainer.world_size), int(trainer.accumulate_grad_batches)


class NextGPTDataModule(L.LightningDataModule):
    """Sources in the NExT-GPT layout, read for one task (caption / generate / instruct).

    Training batches are split over the ranks by :class:`~datamodules.steps.StepSampler` and
    grouped by optimizer step (:class:`~datamodules.steps.StepWindows`); the batches a run has
    consumed go into its checkpoints, so a resumed run continues with exactly the next ones.
    """

    # files are written once, by global rank 0 (a cluster's nodes usually share the file system)
    prepare_data_per_node = False

    def __init__(
        self,
        sources: Sequence[Mapping[str, Any]],
        task: str,
        model: Mapping[str, Any],
        template: str = "vicuna_v0",
        batch_size: int = 4,
        num_workers: int = 0,
        max_length: int = 512,
        val_fraction: float = 0.0,
        seed: int = 0,
        synthetic: Mapping[str, Any] | None = None,
        feature_cache: bool = True,
        cache_fallback: str | None = None,
        denoise_targets: Mapping[str, Mapping[str, Any]] | None = None,
    ):
        super().__init__()
        self.sources = [dict(s) for s in sources]
        self.task, self.model_cfg, self.template = task, model, template
        self.batch_size, self.num_workers, self.max_length = batch_size, num_workers, max_length
        self.val_fraction, self.seed = val_fraction, seed
        self.synthetic = dict(synthetic) if synthetic else None
        self.feature_cache = feature_cache
        self.denoise_targets = dict(denoise_targets or {})
        self.cache_fallback = cache_fallback or str(Path(".cache") / "features")
        self.conversations_by_source: list[tuple[dict, list[Conversation]]] = []
        self.train_set: ConversationDataset | None = None
        self.val_set: ConversationDataset | None = None
        self.skipped_entries: Counter = Counter()
        self.progress = EpochProgress()

    def prepare_data(self) -> None:
        if self.synthetic:
            from datamodules.synthetic import write_synthetic

            write_synthetic(Path(self.synthetic["root"]), num_per_modality=int(self.synthetic["num_per_modality"]),
                            seed=int(self.synthetic["seed"]))

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        from nextgpt.model import load_tokenizer

        self.tokenizer, self.layout = load_tokenizer(self.model_cfg)
        convs: list[Conversation] = []
        for src in self.sources:
            c, skipped = read_source(src["name"], src["modality"], src["root"], self.task)
            convs += c
            self.conversations_by_source.append((src, c))
            self.skipped_entries.update({f"{src['name']}: {k}": v for k, v in skipped.items()})
        features = self._media_features() if self.feature_cache else {}
        if not convs:
            raise ValueError(f"no usable samples in sources {[s['name'] for s in self.sources]} for task {self.task!r}")
        order = torch.randperm(len(convs), generator=torch.Generator().manual_seed(self.seed)).tolist()
        n_val = int(round(self.val_fraction * len(convs)))
        make = lambda idx: ConversationDataset(  # noqa: E731
            [convs[i] for i in idx], self.tokenizer, self.layout, self.template,
            int(self.model_cfg["input_projector"]["num_tokens"]), self.max_length, features, self.denoise_targets,
        )
        self.train_set = make(order[n_val:])
        self.val_set = make(order[:n_val]) if n_val else None
        log.info("data: %d train / %d val conversations (%s); skipped entries: %s", len(self.train_set),
                 n_val, self.task, dict(self.skipped_entries) or "none")

    def _media_features(self) -> dict[str, tuple[Any, str]]:
        """Cached ImageBind features of the sources' media, where a cache exists for this encoder.

        A cache missing some items is completed first (with a progress bar), never ignored.
        """
        from nextgpt.cache import compute_media, media_key, media_store

        rank, world, _ = trainer_topology(self.trainer)
        out: dict[str, tuple[Any, str]] = {}
        encoder = None
        stores = []
        for src, convs in self.conversations_by_source:
            items = {media_key(src["root"], p): p for c in convs for _, p in c.media_in}
            if not items:
                continue
            store = media_store(src, self.model_cfg["encoder"], self.cache_fallback)
            if not store.exists:
                log.info("data: no ImageBind feature cache for %r (python -m nextgpt.cache builds one); "
                         "encoding media on the fly", src["name"])
                continue
            missing = store.missing(items)
            stores.append(store)
            if missing and rank != 0:  # global rank 0 completes it; this rank reads it after the barrier
                out.update({p: (store, k) for k, p in items.items()})
                continue
            if missing:
                log.info("data: feature cache %s is partial (%d of %d items missing): completing it",
                         store.directory, len(missing), len(items))
                if encoder is None:
                    from nextgpt.model import load_encoder

                    encoder = load_encoder(self.model_cfg["encoder"])
                compute_media(store, {k: items[k] for k in missing}, encoder, src["modality"],
                              batch_size=self.batch_size, dtype=store.meta.get("dtype", "float16"))
            log.info("data: using ImageBind feature cache %s for %r (%d items, %d failed)", store.directory,
                     src["name"], len(store), len(store.failed))
            out.update({p: (store, k) for k, p in items.items()})
        if world > 1:
            self.trainer.strategy.barrier("feature caches")
            for store in stores:
                store.reload()
        return out

    def _loader(self, dataset: ConversationDataset, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset, batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers,
            collate_fn=Collator(self.tokenizer.pad_token_id, dataset.num_media_tokens),
            generator=torch.Generator().manual_seed(self.seed) if shuffle else None,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> StepWindows:
        rank, world, accumulate = trainer_topology(self.trainer)
        sampler = StepSampler(len(self.train_set), rank=rank, world_size=world, shuffle=True, seed=self.seed)
        loader = DataLoader(
            self.train_set, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers,
            collate_fn=Collator(self.tokenizer.pad_token_id, self.train_set.num_media_tokens),
            persistent_workers=self.num_workers > 0,
        )
        return StepWindows(loader, accumulate, progress=self.progress)

    def set_epoch(self, epoch: int) -> None:
        self.progress.start(epoch)

    def skipped_before_training(self) -> tuple[Counter, int]:
        """(entries dropped while reading the JSON files, by reason; entries read in all)."""
        return Counter(self.skipped_entries), len(self.train_set or ()) + sum(self.skipped_entries.values())

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        if self.trainer is not None and self.trainer.training:
            self.progress.consumed += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"progress": self.progress.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "progress" in state:
            self.progress.load_state_dict(dict(state["progress"]))


    def val_dataloader(self):
        return self._loader(self.val_set, shuffle=False) if self.val_set is not None else []
