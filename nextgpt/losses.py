"""The loss terms of NExT-GPT, one definition shared by training (:mod:`nextgpt.stages`) and
evaluation (:mod:`nextgpt.evaluation.scoring`).

Each term is a *sum* over a batch; the caller divides by a count (label tokens, groups of a
modality) of whatever it averages over: the whole optimizer step in training (so the gradient
does not depend on how the step is split over ranks and micro-batches), the whole benchmark in
evaluation.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from nextgpt.prompts import IGNORE_INDEX


def caption_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy summed over the labelled (answer) positions; divided by their count
    (``counts["tokens"]`` of the whole step) it is the step's mean."""
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(),
        labels[:, 1:].flatten(),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def chunked_caption_loss_sum(hidden: torch.Tensor, labels: torch.Tensor, head, chunk: int) -> torch.Tensor:
    """:func:`caption_loss_sum` without the (positions x vocabulary) logits of the whole batch: the
    logits of the labelled positions only, ``chunk`` positions at a time, each chunk's recomputed in
    the backward pass (so one chunk's fp32 logits are alive at a time). ``head(hidden)`` gives the
    extended vocabulary's logits (:meth:`nextgpt.model.NextGPT.head_logits`)."""
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    states, wanted = hidden[:, :-1][keep], targets[keep]
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, states.shape[0], chunk):
        total = total + checkpoint(
            _chunk_loss,
            states[start : start + chunk],
            wanted[start : start + chunk],
            head,
            use_reentrant=False,
        )
    return total


def _chunk_loss(states: torch.Tensor, wanted: torch.Tensor, head) -> torch.Tensor:
    return F.cross_entropy(head(states).float(), wanted, reduction="sum")


def alignment_sum(pred: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    """Legacy NExT-GPT alignment of one modality, summed over its groups: per group the mean over
    conditioning tokens of the L2 distance to the target. Zero groups give an exact 0 (that
    keeps the projector in the graph)."""
    if target is None:
        target = torch.zeros_like(pred)
    if target.shape != pred.shape:
        raise ValueError(
            f"alignment targets {tuple(target.shape)} do not match the projector output {tuple(pred.shape)}"
        )
    return (pred.float() - target.to(pred.device).float()).norm(dim=-1).mean(-1).sum()


def modality_mean(
    sums: Mapping[str, torch.Tensor],
    counts: Mapping[str, float],
    kind: str,
    zero: torch.Tensor,
    weights: Mapping[str, float] | None = None,
) -> torch.Tensor:
    """Per modality, ``sums[m]`` over its groups divided by the step's count of them
    (``counts[f"{kind}/{m}"]``), times ``weights[m]`` (default 1; the original weighs stage 3's
    video alignment x2), averaged over the modalities the step holds at all."""
    weights = weights or {}
    present = [k for k, n in counts.items() if k.startswith(f"{kind}/") and n > 0]
    total = sum(
        (
            float(weights.get(m, 1.0)) * v / max(float(counts.get(f"{kind}/{m}", 0)), 1.0)
            for m, v in sums.items()
        ),
        zero,
    )
    return total / max(len(present), 1)


def count_keys(modalities: Iterable[str]) -> list[str]:
    """The normalising counts of a step, in a fixed order (what ranks sum with one all-reduce)."""
    names = list(modalities)
    return ["tokens", *(f"align/{m}" for m in names), *(f"denoise/{m}" for m in names)]
