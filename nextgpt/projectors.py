"""Input and output projectors: the only new networks NExT-GPT trains besides LoRA."""

from __future__ import annotations

import torch
from torch import nn


class InputProjector(nn.Module):
    """ImageBind vector -> ``num_tokens`` LLM embeddings.

    ``num_tokens=1`` is exactly the legacy Linear(1024 -> 4096); more tokens give the current
    variant's grouped projection (one linear map to ``num_tokens`` groups of the LLM width).
    """

    def __init__(self, in_dim: int, out_dim: int, num_tokens: int = 1):
        super().__init__()
        self.num_tokens, self.out_dim = num_tokens, out_dim
        self.proj = nn.Linear(in_dim, out_dim * num_tokens)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj(features).view(features.shape[0], self.num_tokens, self.out_dim)


class OutputProjector(nn.Module):
    """Signal-token hidden states -> a diffusion decoder's text conditioning.

    Linear(LLM width -> d_model), a ``torch.nn.Transformer`` whose decoder reads ``out_seq``
    learnable queries, then Linear(d_model -> decoder width): the original's ``TextFcLayer`` in
    its ``transformer`` mode. The original is pre-norm (``norm_first=True``), ``dropout=0.0``, with
    queries drawn from ``randn`` (``query_std=1.0``); ``model=nextgpt_7b_legacy`` sets all three.
    ``query_std=None`` scales the queries by ``d_model ** -0.5`` (unit-norm rows).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        out_seq: int,
        *,
        d_model: int = 512,
        nhead: int = 4,
        num_encoder_layers: int = 4,
        num_decoder_layers: int = 4,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        norm_first: bool = False,
        query_std: float | None = None,
    ):
        super().__init__()
        self.in_fc = nn.Linear(in_dim, d_model)
        self.transformer = nn.Transformer(
            d_model=d_model,
            nhead=nhead,
            num_encoder_layers=num_encoder_layers,
            num_decoder_layers=num_decoder_layers,
            dim_feedforward=dim_feedforward,
            dropout=dropout,
            batch_first=True,
            norm_first=norm_first,
        )
        std = d_model**-0.5 if query_std is None else float(query_std)
        self.queries = nn.Parameter(torch.randn(out_seq, d_model) * std)
        self.out_fc = nn.Linear(d_model, out_dim)

    def forward(self, signal_states: torch.Tensor) -> torch.Tensor:
        """(groups, n_signal, in_dim) -> (groups, out_seq, out_dim)."""
        x = self.in_fc(signal_states.to(self.in_fc.weight.dtype))
        queries = self.queries.unsqueeze(0).expand(x.shape[0], -1, -1)
        return self.out_fc(self.transformer(x, queries))
