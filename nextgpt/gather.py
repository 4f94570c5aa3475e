"""The whole value of a parameter that may be sharded (an FSDP2 ``DTensor``, a DeepSpeed ZeRO-3
partition): what bundles and the LLM's vocabulary rows are written from. Apart from
:mod:`nextgpt.strategies` so that writing a bundle does not load Lightning."""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor


def full_tensor(p: torch.Tensor) -> torch.Tensor:
    """The whole value of a parameter that may be sharded (an FSDP2 ``DTensor``, a ZeRO-3
    partition), on the CPU. Under sharding this is a collective: every rank calls it for the same
    parameters in the same order."""
    if isinstance(p, DTensor):
        return p.full_tensor().detach().cpu()
    if hasattr(p, "ds_id"):  # a DeepSpeed ZeRO-3 partition
        import deepspeed  # deferred: deepspeed is optional and costs ~1 s; only a ZeRO-3 run gets here

        with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
            return p.detach().cpu().clone()
    return p.detach().cpu()
