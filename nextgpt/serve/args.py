"""The checked command line of ``python -m nextgpt.serve`` (light: :mod:`nextgpt.serve.__main__`
builds it before torch and the model stack load; :mod:`nextgpt.serve.launch` serves it)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServeArgs:
    """The checked command line (one field per key of :data:`OPTIONS`)."""

    bundle: str
    host: str
    port: int
    device: str | None
    out: str
    model_name: str | None
    max_upload_mb: float
    max_queue: int
    max_tokens: int
    default_max_tokens: int
    keep_requests: int
    weights: str | None
    backbones: str | None
    log_level: str
