"""Optimizers and learning-rate schedules, built from ``stage.optim`` by Hydra.

``stage.optim.optimizer`` and ``stage.optim.scheduler`` are ``_target_`` + ``_partial_`` nodes
(config groups ``optimizer/`` and ``scheduler/``): the stage calls the optimizer with the
trainable parameters, and the scheduler with the optimizer and the run's total number of
optimizer steps. Any callable of those shapes can be named, e.g.
``stage.optim.optimizer._target_=bitsandbytes.optim.AdamW8bit``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import hydra
import torch
from torch.optim.lr_scheduler import LambdaLR

from nextgpt.spec import OptimSpec

OptimizerFactory = Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[..., torch.optim.lr_scheduler.LRScheduler]


def _warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    if not 0.0 <= warmup_ratio < 1.0:
        raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup_ratio}")
    return int(warmup_ratio * max(1, total_steps))


WARMUP_TYPES = ("linear", "log")


def warmup_linear_decay(
    optimizer: torch.optim.Optimizer,
    *,
    total_steps: int,
    warmup_ratio: float = 0.1,
    min_ratio: float = 0.0,
    warmup_type: str = "linear",
    min_warmup_steps: int = 0,
) -> LambdaLR:
    """Warm-up from ~0 to the optimizer's lr, then linear decay to ``min_ratio`` x lr at
    ``total_steps`` (DeepSpeed's ``WarmupDecayLR``, which the reference used).

    ``warmup_type="log"`` with ``min_warmup_steps=10`` is the original's exact schedule: DeepSpeed's
    default log warm-up, ``lr x log(step + 1) / log(warmup)``, over ``max(10, warmup_ratio x total)``
    steps (``model/agent.py``)."""
    if warmup_type not in WARMUP_TYPES:
        raise ValueError(f"warmup_type must be one of {WARMUP_TYPES}, got {warmup_type!r}")
    total = max(1, int(total_steps))
    warmup = max(_warmup_steps(total, warmup_ratio), int(min_warmup_steps))

    def factor(step: int) -> float:
        if step < warmup:
            if warmup_type == "log":
                return math.log(step + 1) / math.log(warmup) if warmup > 1 else 1.0
            return (step + 1) / (warmup + 1)
        return max(min_ratio, min_ratio + (1.0 - min_ratio) * (total - step) / max(1, total - warmup))

    return LambdaLR(optimizer, factor)


def warmup_cosine_decay(
    optimizer: torch.optim.Optimizer, *, total_steps: int, warmup_ratio: float = 0.1, min_ratio: float = 0.0
) -> LambdaLR:
    """Linear warm-up, then half a cosine down to ``min_ratio`` x lr at ``total_steps``."""
    total = max(1, int(total_steps))
    warmup = _warmup_steps(total, warmup_ratio)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)


def constant(optimizer: torch.optim.Optimizer, *, total_steps: int, warmup_ratio: float = 0.0) -> LambdaLR:
    """Linear warm-up, then the optimizer's lr unchanged."""
    warmup = _warmup_steps(total_steps, warmup_ratio)
    return LambdaLR(optimizer, lambda step: (step + 1) / (warmup + 1) if step < warmup else 1.0)


def build_optimizer(optim: OptimSpec, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """Instantiate ``optim.optimizer`` (a partial) over ``params``; without that node (a config
    written before it existed), AdamW with the stage's lr, weight decay and betas."""
    if not optim.optimizer:
        return torch.optim.AdamW(
            list(params), lr=optim.lr, weight_decay=optim.weight_decay, betas=optim.betas
        )
    factory = hydra.utils.instantiate(dict(optim.optimizer), _convert_="all")
    return factory(list(params))


def build_scheduler(optim: OptimSpec, optimizer: torch.optim.Optimizer, total_steps: int):
    """Instantiate ``optim.scheduler`` (a partial) for ``optimizer`` and ``total_steps``; without
    that node, linear warm-up and decay over ``warmup_ratio``."""
    if not optim.scheduler:
        return warmup_linear_decay(optimizer, total_steps=total_steps, warmup_ratio=optim.warmup_ratio)
    factory = hydra.utils.instantiate(dict(optim.scheduler), _convert_="all")
    return factory(optimizer, total_steps=int(total_steps))
