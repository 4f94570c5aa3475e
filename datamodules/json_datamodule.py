"""The DataModule of all three stages: NExT-GPT-layout sources -> tokenised, collated batches.

Media are decoded and tokenised in the dataloader workers; an unreadable sample is skipped
(returned as ``None``), named in the log and counted in the batch (``num_skipped``).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import torch
from torch.utils.data import DataLoader

from datamodules.base import SourceDataModule, trainer_topology
from datamodules.nextgpt_layout import read_source, source_files
from datamodules.records import EpochState
from datamodules.source_files import json_files
from datamodules.steps import BalancedStepSampler, StepSampler, StepWindows
from nextgpt.batch import Collator, ConversationDataset
from nextgpt.cache.captions import CaptionTargets
from nextgpt.cache.encode import caption_store, compute_captions, media_key, media_store
from nextgpt.data_source import DataSource, PairSettings, SourceEntry, SyntheticSettings
from nextgpt.model_spec import ModelSpec
from nextgpt.prompts import Conversation
from nextgpt.runs import DataError

log = logging.getLogger(__name__)


def json_path_errors(name: str, sources: Sequence[DataSource], objective: str) -> list[str]:
    """Missing JSON files of sources read straight from the NExT-GPT layout (or one of the
    original's stage-3 files) for ``objective``."""
    errors = []
    for i, src in enumerate(sources):
        if src.format != "nextgpt":  # one of the original's stage-3 files
            if not Path(str(src.file)).is_file():
                errors.append(f"dataset.sources[{i}].file={src.file!r}: no such file (format {src.format})")
            continue
        errors += [
            f"dataset.sources[{i}].root={src.root!r}: {path} does not exist (dataset {name!r}; set "
            "paths.data_root=DIR)"
            for path in json_files(src.name, src.data_root, objective)
            if not path.is_file()
        ]
    return errors


class NextGPTDataModule(SourceDataModule):
    """Sources in the NExT-GPT layout, read for one objective (caption / generate / instruct).

    Training batches are split over the ranks by :class:`~datamodules.steps.StepSampler` and
    grouped by optimizer step (:class:`~datamodules.steps.StepWindows`); the batches a run has
    consumed go into its checkpoints, so a resumed run continues with exactly the next ones.
    """

    def __init__(
        self,
        sources: Sequence[SourceEntry | DataSource],
        objective: str,
        model: ModelSpec,
        template: str = "vicuna_v0",
        batch_size: int = 4,
        num_workers: int = 0,
        max_length: int = 512,
        val_fraction: float = 0.0,
        seed: int = 0,
        synthetic: SyntheticSettings | None = None,
        feature_cache: bool = True,
        cache_fallback: str | None = None,
        denoise_targets: Mapping[str, Mapping[str, Any]] | None = None,
        pairs: PairSettings | None = None,
        pack: bool = False,
        mix: str = "weighted",
        name: str = "",
        media_identity: str = "listing",
    ):
        super().__init__(
            sources,
            objective,
            model,
            template,
            batch_size,
            num_workers,
            max_length,
            seed,
            feature_cache,
            cache_fallback,
            pairs,
            pack,
            name,
            media_identity,
        )
        if mix not in ("weighted", "balanced"):
            raise ValueError(
                f"dataset.mix={mix!r}: must be weighted (batches mix the sources) or balanced "
                "(one source per batch, in turn)"
            )
        self.mix = mix
        self.train_sources: list[int] = []  # the source index of each training sample
        self.val_fraction = val_fraction
        self.synthetic = SyntheticSettings(**synthetic) if synthetic else None
        self.denoise_targets = dict(denoise_targets or {})
        self.train_set: ConversationDataset | None = None
        self.val_set: ConversationDataset | None = None
        self.skipped_entries: Counter = Counter()

    def path_errors(self) -> list[str]:
        """Missing JSON files of the sources. Generated data is written first (``prepare_data``:
        idempotent, and locked against a concurrent writer), so that it is checked, and signed into
        the run's key (``identity()``), like any other from the run's first start: a first run killed
        before its data existed would otherwise get another key on its rerun, and not resume."""
        self.prepare_data()
        return json_path_errors(self.dataset_name, self.sources, self.objective)

    def prepare_data(self) -> None:
        if self.synthetic:
            from nextgpt.world import synthetic  # deferred: nextgpt.world stays off the real-weights path

            synthetic.write_synthetic(
                Path(self.synthetic["root"]),
                num_per_modality=int(self.synthetic["num_per_modality"]),
                seed=int(self.synthetic["seed"]),
            )

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        self.tokenizer, self.layout = self.tokenizer_and_layout()
        convs: list[Conversation] = []
        source_of: list[int] = []
        for k, src in enumerate(self.sources):
            # every rank reads the files (and counts their skips alike, once in the report); rank 0 names them
            c, skipped = read_source(
                src.name,
                src.modality,
                src.data_root,
                self.objective,
                warn=trainer_topology(self.trainer)[0] == 0,
                fmt=src.format,
                file=src.file,
            )
            c = [self.pair_style.apply(conv) for conv in c]
            convs += c
            source_of += [k] * len(c)
            self.conversations_by_source.append((src, c))
            self.skipped_entries.update({f"{src.name}: {k}": v for k, v in skipped.items()})
        features = self._media_features() if self.feature_cache else {}
        if not convs:
            files = [str(f) for src in self.sources for f, _ in source_files(src, self.objective)]
            raise DataError(
                f"no usable sample for objective {self.objective!r} in {', '.join(files)}: "
                + (
                    f"every entry was skipped ({dict(self.skipped_entries)})"
                    if self.skipped_entries
                    else "the files hold no entries"
                )
            )
        order = torch.randperm(len(convs), generator=torch.Generator().manual_seed(self.seed)).tolist()
        n_val = int(round(self.val_fraction * len(convs)))
        make = lambda idx: ConversationDataset(  # noqa: E731
            [convs[i] for i in idx],
            self.tokenizer,
            self.layout,
            self.template,
            self.model_spec.input_projector.num_tokens,
            self.max_length,
            features,
            self.denoise_targets,
        )
        self.train_set = make(order[n_val:])
        self.train_sources = [source_of[i] for i in order[n_val:]]
        self.val_set = make(order[:n_val]) if n_val else None
        log.info(
            "data: %d train / %d val conversations (%s); skipped entries: %s",
            len(self.train_set),
            n_val,
            self.objective,
            dict(self.skipped_entries) or "none",
        )

    def open_caption_stores(
        self,
        targets: CaptionTargets,
        *,
        device: torch.device | str,
        is_global_zero: bool = True,
        barrier: Callable[[], None] = lambda: None,
    ) -> None:
        """Attach each source's caption cache (next to its data) to the stage's alignment targets,
        created on first use and completed with the captions it lacks: rank 0 writes, the other
        ranks wait at ``barrier``, then read."""
        if not is_global_zero:
            barrier()
        for src, convs in self.conversations_by_source:
            conditioner = targets.conditioners.get(src.modality)
            captions = [cap for c in convs for name, cap in c.captions_out if name == src.modality]
            if conditioner is None or not captions:
                continue
            store = caption_store(src, conditioner.to(device), self.cache_fallback)
            if is_global_zero:
                before = len(store)
                added = compute_captions(store, captions, conditioner)
                state = "created" if not before else ("completed" if added else "complete")
                log.info(
                    "caption cache %s %s: %d embeddings (%d new)", store.directory, state, len(store), added
                )
            targets.attach(src.modality, store)
        if is_global_zero:
            barrier()
        targets.refresh()

    def _media_features(self) -> dict[str, tuple[Any, str]]:
        """Cached ImageBind features of the sources' media, where a cache exists for this encoder:
        cached items are read from it, the others decoded and encoded by the model as usual.
        Training never writes a media cache (``python -m nextgpt.cache`` builds and completes them,
        any number of processes at once), so no rank loads a second ImageBind or waits for one."""
        out: dict[str, tuple[Any, str]] = {}
        for src, convs in self.conversations_by_source:
            items = {media_key(src.data_root, p): p for c in convs for _, p in c.media_in}
            if not items:
                continue
            store = media_store(src, self.model_spec.encoder, self.cache_fallback)
            if not store.exists:
                log.info(
                    "data: no ImageBind feature cache for %r (python -m nextgpt.cache builds one); "
                    "encoding media on the fly",
                    src.name,
                )
                continue
            missing = set(store.missing(items))
            if missing:
                log.info(
                    "data: feature cache %s is partial (%d of %d items missing: encoded on the fly; "
                    "python -m nextgpt.cache completes it)",
                    store.directory,
                    len(missing),
                    len(items),
                )
            log.info(
                "data: using ImageBind feature cache %s for %r (%d items, %d failed)",
                store.directory,
                src.name,
                len(store),
                len(store.failed),
            )
            out.update({p: (store, k) for k, p in items.items() if k not in missing})
        return out

    def _loader(self, dataset: ConversationDataset, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            collate_fn=Collator(self.tokenizer.pad_token_id, dataset.num_media_tokens, self.pack_length),
            generator=torch.Generator().manual_seed(self.seed) if shuffle else None,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> StepWindows:
        rank, world, accumulate = trainer_topology(self.trainer)
        # overfitting (trainer.overfit_batches, debug=overfit): the same first batches every epoch
        overfit = bool(getattr(self.trainer, "overfit_batches", 0))
        train_set = self.train_set
        assert train_set is not None  # setup built it: Lightning sets up before asking for loaders
        sampler: StepSampler
        if self.mix == "balanced":
            sampler = BalancedStepSampler(
                self.train_sources,
                self.batch_size,
                rank=rank,
                world_size=world,
                shuffle=not overfit,
                seed=self.seed,
            )
        else:
            sampler = StepSampler(
                len(train_set), rank=rank, world_size=world, shuffle=not overfit, seed=self.seed
            )
        loader = DataLoader(
            train_set,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=Collator(self.tokenizer.pad_token_id, train_set.num_media_tokens, self.pack_length),
            persistent_workers=self.num_workers > 0,
        )
        return StepWindows(loader, accumulate, progress=self.progress)

    def skipped_before_training(self) -> tuple[Counter, int]:
        """(entries dropped while reading the JSON files, by reason; entries read in all)."""
        return Counter(self.skipped_entries), len(self.train_set or ()) + sum(self.skipped_entries.values())

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        self.count_delivered()
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"progress": self.progress.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "progress" in state:
            self.progress.load_state_dict(cast(EpochState, dict(state["progress"])))

    def val_dataloader(self):
        return self._loader(self.val_set, shuffle=False) if self.val_set is not None else []
