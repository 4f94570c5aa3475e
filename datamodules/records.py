"""The JSON the data side reads and writes, as types: entries of the data files (the NExT-GPT layout,
the original's stage-3 formats, VideoChat), shard records, source identities and the states the
readers put into checkpoints.

Entries come from files that others write: every key is optional here (``total=False``) and each
reader still checks what it finds (a malformed entry is skipped with its reason). Besides the keys
listed, an entry holds per-modality fields that the readers name through the modality
(:class:`nextgpt.modality.Modality`): ``<m>_name``, ``<m>_id``, ``<m>``, ``input_<m>``,
``output_<m>``, ``<m>_captions`` (e.g. ``image_name``, ``input_video``, ``audio_captions``).
"""

from __future__ import annotations

from typing import TypedDict

# --- data files ---------------------------------------------------------------------------------

# one message of a LLaVA-style conversation (``from`` is a keyword: the functional form)
Message = TypedDict(
    "Message",
    {
        "from": str,  # human | gpt
        "value": str,
        "input_modality": str,  # t2x files
        "output_modality": str,  # t2x files: the modality a gpt message generates (text: none)
        "caption": str,  # t2x files: the caption of what it generates
    },
    total=False,
)


class QAItem(TypedDict, total=False):
    """One item of VideoChat's ``QA`` list: instruction, question, answer."""

    i: str
    q: str
    a: str


class Entry(TypedDict, total=False):
    """One entry of a data file, in any of the formats read (see the module docstring)."""

    id: str | int
    caption: str  # a text-X pair's caption
    conversations: list[Message]  # LLaVA-style
    conversation: list[Message]  # the legacy code's files
    QA: list[QAItem]  # VideoChat
    mm_name: str  # t2x
    image: str | list[str]  # LLaVA (Hugging Face)
    image_name: str  # pairs; LLaVA as the legacy code converts it
    video: str | list[str]  # VideoChat
    instruction: str  # Alpaca
    input: str
    output: str


# --- shards -------------------------------------------------------------------------------------


class ShardRecord(TypedDict, total=False):
    """The ``.json`` member of a shard sample ``prepare`` wrote (:mod:`datamodules.shard_writer`):
    a ``pair`` or a ``conversation`` record."""

    kind: str  # pair | conversation
    key: str
    source: str
    caption: str  # pair
    media: list[str]  # pair: [modality, member extension]
    turns: list[list[str]]  # conversation: [[human, assistant], ...]
    media_in: list[list[str]]  # [[modality, member extension], ...]
    captions_out: list[list[str]]  # [[modality, caption], ...]
    media_out: list[list[str]]


class MediaListing(TypedDict):
    """The files under a source's media folder: count, total size and a digest of their listing."""

    files: int
    bytes: int
    digest: str


class SourceIdentity(TypedDict, total=False):
    """What a data source is (:mod:`datamodules.identity`): its resolved ``root``, the signatures of
    its ``json`` files (file name -> signature) and, unless left out, its ``media`` listing. An index
    written before identities records the JSON signatures alone (file name -> signature)."""

    root: str
    json: dict[str, str]
    media: MediaListing


# --- checkpoint states --------------------------------------------------------------------------


class EpochState(TypedDict, total=False):
    """:class:`datamodules.steps.EpochProgress`: training batches of ``epoch`` handed out so far."""

    epoch: int
    consumed: int


class PassState(TypedDict):
    """:class:`datamodules.shards.progress.StreamProgress` (JSON-safe): the pass, the topology
    (world size, workers) and each (rank, worker slot)'s last position ``"r:s" -> [epoch, index]``."""

    epoch: int
    topology: list[int] | None
    progress: dict[str, list[int]]
    rotation: dict[str, int]


class StreamState(PassState):
    """:class:`datamodules.shards.ShardStream`: what an exact restart needs."""

    version: int
    fingerprint: str
    seed: int
    shuffle: bool
    shuffle_shards: int
    seen: int
    skipped: dict[str, int]


class SkipState(TypedDict):
    """:class:`datamodules.shards.skips.SkipLedger`: samples seen and skipped, by reason."""

    seen: int
    skipped: dict[str, int]
