"""What the two data modules share: sources of one objective read for one model, delivered as batches
of the collator contract (:mod:`nextgpt.batch`), with an epoch progress that checkpoints carry
so a resumed run continues with exactly the next batches."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import lightning as L

from datamodules.source_files import shard_set, source_identity
from datamodules.steps import EpochProgress
from nextgpt.data_source import DataSource, PairSettings, SourceEntry, SourceIdentity, data_sources
from nextgpt.model_spec import ModelSpec
from nextgpt.prompts import PairStyle
from nextgpt.tokens import Tokens, load_tokenizer


def trainer_topology(trainer) -> tuple[int, int, int]:
    """(global rank, world size, accumulate_grad_batches) of ``trainer``; one process without one."""
    if trainer is None:
        return 0, 1, 1
    return int(trainer.global_rank), int(trainer.world_size), int(trainer.accumulate_grad_batches)


class SourceDataModule(L.LightningDataModule):
    """Base of :class:`~datamodules.json_datamodule.NextGPTDataModule` (the NExT-GPT JSON layout) and
    :class:`~datamodules.shard_datamodule.ShardDataModule` (WebDataset shards)."""

    # files are written once, by global rank 0 (a cluster's nodes usually share the file system)
    prepare_data_per_node = False

    def __init__(
        self,
        sources: Sequence[SourceEntry | DataSource],
        objective: str,
        model: ModelSpec,
        template: str,
        batch_size: int,
        num_workers: int,
        max_length: int,
        seed: int,
        feature_cache: bool,
        cache_fallback: str | None,
        pairs: PairSettings | None = None,
        pack: bool = False,
        name: str = "",
        media_identity: str = "listing",
    ):
        super().__init__()
        self.dataset_name = name  # dataset.name, for messages
        self.media_identity = media_identity  # dataset.media_identity: how media enter the identity
        # the tokenizer and token layout the model uses too (train.py loads them once for both and
        # shares them: share_tokens); None: setup loads them from model.llm.path
        self.tokens: Tokens | None = None
        # dataset.pack: several samples per row of max_length tokens (nextgpt.batch.Collator)
        self.pack_length = int(max_length) if pack else None
        # how text-X pairs read for stages 1-2 read in training (dataset.pairs: ours / legacy)
        self.pair_style = PairStyle(**(pairs or PairSettings()))
        self.sources = data_sources(sources)
        # the model's spec
        self.objective, self.model_spec, self.template = objective, model, template
        self.batch_size, self.num_workers, self.max_length, self.seed = (
            batch_size,
            num_workers,
            max_length,
            seed,
        )
        self.feature_cache = feature_cache
        self.cache_fallback = cache_fallback or str(
            Path(".cache") / "features"
        )  # where unwritable data caches go
        self.conversations_by_source: list = []
        self.progress = EpochProgress()

    # --- what train.py asks before anything is read --------------------------------------------
    def path_errors(self) -> list[str]:
        """What the sources lack for this objective, each naming its ``dataset.sources[i]`` key:
        each data module checks its sources as it reads them."""
        raise NotImplementedError

    def identity(self) -> dict[str, SourceIdentity]:
        """The identity of every source read from a data root (:mod:`datamodules.source_files`: the
        resolved root, JSON files, media): another root or edited data is another run."""
        return {
            src.name: source_identity(
                src.root,
                src.name,
                src.modality,
                shard_set(self.objective),
                self.media_identity,
                file=src.file if src.format != "nextgpt" else None,
            )
            for src in self.sources
            if src.root and not src.urls and Path(src.root).is_dir()
        }

    def share_tokens(self, tokens: Tokens) -> None:
        """Read with the model's tokenizer and token layout (train.py loads them once for both)."""
        self.tokens = tokens

    def tokenizer_and_layout(self) -> Tokens:
        """The tokenizer with NExT-GPT's tokens, and their layout: the model's own when given."""
        return self.tokens if self.tokens is not None else load_tokenizer(self.model_spec)

    def set_epoch(self, epoch: int) -> None:
        """Called by the training loop at each epoch start (epochs count batches, see EpochProgress)."""
        self.progress.start(epoch)

    def count_delivered(self) -> None:
        """One more training batch handed to the model (what a resumed run skips)."""
        if self.trainer is not None and self.trainer.training:
            self.progress.consumed += 1
