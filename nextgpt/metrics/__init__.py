"""Evaluation metrics. Every metric either returns a number or raises ``Unavailable`` with the
reason (missing Java, missing feature-network weights, too few items): a metric that can not be
computed properly is reported as unavailable, never as a substitute number."""

from __future__ import annotations

from typing import Any


class Unavailable(RuntimeError):
    """A metric that can not be computed here; the message says why and what would fix it."""


def value(v: float | None = None, *, unavailable: str | None = None, **details: Any) -> dict[str, Any]:
    """One metric entry of results.json: ``{"value": 1.23, ...}`` or ``{"value": null, "unavailable": why}``."""
    if unavailable is not None:
        return {"value": None, "unavailable": unavailable, **details}
    return {"value": None if v is None else float(v), **details}
