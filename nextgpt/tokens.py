"""NExT-GPT's new tokens, kept in a small trainable table beside the frozen LLM matrices.

The reference trained the whole input-embedding and LM-head matrices to learn a handful of
new tokens (tens of millions of needless trainable weights, and a silently changed "frozen"
LLM). Here the LLM's matrices stay untouched: ids at or above ``TokenLayout.first_new_id``
are looked up in ``NewTokenTable`` and their logits come from its own head rows.

``load_tokenizer`` is where a run gets the LLM's tokenizer with these tokens added: once, shared by
the data module and the stage.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from nextgpt import modality as modality_registry
from nextgpt.model_spec import ModelSpec


@dataclass(frozen=True)
class TokenLayout:
    """Where each new token lives in the extended vocabulary.

    Ids ``[first_new_id, first_new_id + n_markers)`` are the input markers (<Img> </Img> ...),
    the next ``n_signals`` ids are the output signal tokens ([IMG0] ... [VID23]).
    """

    first_new_id: int
    markers: tuple[str, ...]
    signals: tuple[str, ...]
    marker_ids: Mapping[str, tuple[int, int]]  # modality -> (open id, close id)
    signal_ids: Mapping[str, tuple[int, ...]]  # modality -> ids of its signal group

    @property
    def vocab_size(self) -> int:
        return self.first_new_id + len(self.markers) + len(self.signals)

    def signal_modality(self, token_id: int) -> str | None:
        for name, ids in self.signal_ids.items():
            if token_id in ids:
                return name
        return None


MARKER_STYLES = ("per_modality", "shared")
# model.vocab_rows: which rows of the LLM's embedding and head train. "new": only the new tokens'
# (NewTokenTable; the LLM's matrices stay frozen, the project's default); "all": every row, as the
# original did (it resized the matrices after freezing the LLM, and transformers 4.29 made resized
# matrices trainable modules). The trained old rows go into the bundle as base_rows.safetensors.
VOCAB_ROWS = ("new", "all")


def marker_tokens(name: str, style: str = "per_modality") -> tuple[str, str]:
    """The (open, close) markers around modality ``name``'s projected input. ``shared``: the
    original's ``<Img>`` / ``</Img>`` around every modality (its vocabulary has no other)."""
    if style not in MARKER_STYLES:
        raise ValueError(f"unknown marker style {style!r}; known: {list(MARKER_STYLES)}")
    mod = modality_registry.get("image" if style == "shared" else name)
    return mod.open_token, mod.close_token


def nextgpt_tokens(
    signal_counts: Mapping[str, int], markers: str = "per_modality"
) -> tuple[list[str], list[str]]:
    """Marker and signal token strings for the given modalities, in a fixed order."""
    marker_list: list[str] = []
    signals: list[str] = []
    for name, count in signal_counts.items():
        marker_list += [t for t in marker_tokens(name, markers) if t not in marker_list]
        signals += modality_registry.get(name).signal_tokens(count)
    return marker_list, signals


def add_nextgpt_tokens(
    tokenizer, signal_counts: Mapping[str, int], markers: str = "per_modality"
) -> TokenLayout:
    """Add the new tokens to ``tokenizer`` (as unsplittable special tokens) and say where they went.

    ``markers``: ``per_modality`` (``<Img>``, ``<Aud>``, ``<Vid>``, ...) or ``shared`` (``<Img>`` for
    every modality, as the original)."""
    marker_list, signals = nextgpt_tokens(signal_counts, markers)
    first_new_id = len(tokenizer)
    existing = [t for t in marker_list + signals if t in tokenizer.get_vocab()]
    if existing:
        raise ValueError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} already contains NExT-GPT tokens {existing[:5]}; "
            "load the base LLM tokenizer, not one saved with the new tokens"
        )
    tokenizer.add_tokens(marker_list + signals, special_tokens=True)
    ids = tokenizer.convert_tokens_to_ids(marker_list + signals)
    expected = list(range(first_new_id, first_new_id + len(marker_list) + len(signals)))
    if ids != expected:
        raise RuntimeError(
            f"new tokens got ids {ids[:4]}..., expected a contiguous block from {first_new_id}"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    marker_ids: dict[str, tuple[int, int]] = {}
    signal_ids: dict[str, tuple[int, ...]] = {}
    for name, count in signal_counts.items():
        mod = modality_registry.get(name)
        marker_ids[name] = tuple(tokenizer.convert_tokens_to_ids(list(marker_tokens(name, markers))))
        signal_ids[name] = tuple(tokenizer.convert_tokens_to_ids(mod.signal_tokens(count)))
    return TokenLayout(first_new_id, tuple(marker_list), tuple(signals), marker_ids, signal_ids)


# the LLM's tokenizer with NExT-GPT's tokens, and where those tokens sit: one pair per run, shared
# by the data and the model
Tokens = tuple[PreTrainedTokenizerBase, TokenLayout]


def load_tokenizer(spec: ModelSpec) -> Tokens:
    """The LLM's tokenizer with NExT-GPT's tokens added: the same for the model and the data."""
    tokenizer = AutoTokenizer.from_pretrained(spec.llm.path)
    layout = add_nextgpt_tokens(tokenizer, spec.signal_counts, markers=spec.markers)
    return tokenizer, layout


class TokenRows(nn.Module):
    """Embedding rows and LM-head rows of a group of new tokens."""

    def __init__(self, num: int, embed_init: torch.Tensor, head_init: torch.Tensor, noise: float = 0.02):
        super().__init__()
        gen = torch.Generator().manual_seed(num)
        scale_e = noise * embed_init.float().std().clamp_min(1e-6)
        scale_h = noise * head_init.float().std().clamp_min(1e-6)
        self.embed = nn.Parameter(
            embed_init.float().repeat(num, 1) + scale_e * torch.randn(num, embed_init.numel(), generator=gen)
        )
        self.head = nn.Parameter(
            head_init.float().repeat(num, 1) + scale_h * torch.randn(num, head_init.numel(), generator=gen)
        )


class NewTokenTable(nn.Module):
    """Trainable rows for the new tokens: ``markers`` (input side) and ``signals`` (output side).

    Two groups, so that a stage can train the signal rows without touching the marker rows.
    New rows start at the mean of the frozen rows (plus small noise), as HF's resize does.
    """

    def __init__(self, layout: TokenLayout, base_embedding: nn.Embedding, base_head: nn.Module):
        super().__init__()
        self.first_new_id = layout.first_new_id
        embed_mean = base_embedding.weight[: layout.first_new_id].detach().float().mean(0)
        head_weight = getattr(base_head, "weight", None)
        head_mean = (
            head_weight[: layout.first_new_id].detach().float().mean(0)
            if head_weight is not None
            else torch.zeros_like(embed_mean)
        )
        self.markers = TokenRows(len(layout.markers), embed_mean, head_mean)
        self.signals = TokenRows(len(layout.signals), embed_mean, head_mean)

    def embed(self, input_ids: torch.Tensor, base_embedding: nn.Embedding) -> torch.Tensor:
        is_new = input_ids >= self.first_new_id
        base = base_embedding(torch.where(is_new, torch.zeros_like(input_ids), input_ids))
        rows = torch.cat([self.markers.embed, self.signals.embed]).to(base.dtype)
        # F.embedding, not rows[ids]: its CPU backward sums each row's gradients in one fixed order,
        # where indexing's (index_put_ with accumulate) adds from several threads at once, and two
        # runs of one seed drifted apart by the last bits of these rows' gradients
        new = F.embedding((input_ids - self.first_new_id).clamp_min(0), rows)
        return torch.where(is_new.unsqueeze(-1), new, base)

    def logits(self, hidden: torch.Tensor, base_logits: torch.Tensor) -> torch.Tensor:
        """Logits over the extended vocabulary: the LLM's own rows, then the new rows."""
        head = torch.cat([self.markers.head, self.signals.head]).to(hidden.dtype)
        return torch.cat([base_logits[..., : self.first_new_id], hidden @ head.T], dim=-1)
