"""Batched generation for benchmarks: many requests through the LLM at once, then each decoder
once per batch.

It follows ``Generator.chat`` step for step, so that a batch gives what one ``chat`` call per
request gives (a test holds it to that): prompts are left-padded into one batch and decoded with
the KV cache; when a row emits a signal token of a modality, the rest of that modality's group is
forced one token per step (the same hidden states as feeding the group at once); a group that
begins mid-way is repaired and noted. Each row samples from its own generator seeded like
``chat``. The groups of all rows that asked for the same decoder go through its output projector
and its diffusers pipeline as one batch, each with its own seeded noise.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nextgpt import modality as modality_registry
from nextgpt.generate import (
    CACHE,
    GenerationInputError,
    GenerationResult,
    Generator,
    modality_of_file,
    with_placeholders,
)
from nextgpt.prompts import Conversation


@dataclass
class Request:
    prompt: str
    media: Sequence[str | Path] = ()
    seed: int = 0


@dataclass
class _Row:
    result: GenerationResult
    gen: torch.Generator
    text_ids: list[int] = field(default_factory=list)
    pieces: list[str] = field(default_factory=list)
    queue: list[int] = field(default_factory=list)  # the rest of a signal group being forced
    group: tuple[str, list[torch.Tensor], list[int]] | None = (
        None  # (modality, hidden states, ids) in progress
    )
    groups: list[tuple[str, torch.Tensor, list[int]]] = field(default_factory=list)
    fed: str = ""  # what this step fed: "text", "signal" or "" (finished)
    done: bool = False


class BatchedGenerator:
    """Wraps a loaded ``Generator`` (its model, tokenizer, template and pipelines)."""

    def __init__(self, generator: Generator):
        self.g = generator

    # --- the LLM ---------------------------------------------------------------------------
    def _prefill_embeds(self, requests: Sequence[Request]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        g = self.g
        rows, prompts = [], []
        for r in requests:
            if not r.prompt or not r.prompt.strip():
                raise GenerationInputError("the prompt is empty")
            for p in r.media:
                if not Path(p).is_file():
                    raise GenerationInputError(f"{p}: no such media file")
            prompt = with_placeholders(r.prompt, r.media)
            conv = Conversation(
                "request", [(prompt, "")], media_in=[(modality_of_file(p), str(p)) for p in r.media]
            )
            rows.append(g._encode_prompt(conv)[0])
            prompts.append(prompt)
        length = max(e.shape[0] for e in rows)
        embeds = rows[0].new_zeros(len(rows), length, rows[0].shape[-1])
        mask = torch.zeros(len(rows), length, dtype=torch.long, device=g.device)
        for i, e in enumerate(rows):  # left padding: every row's last prompt token is at the end
            embeds[i, length - e.shape[0] :] = e
            mask[i, length - e.shape[0] :] = 1
        return embeds, mask, prompts

    def _step(self, embeds: torch.Tensor, mask: torch.Tensor, past):
        positions = (mask.cumsum(-1) - 1).clamp_min(0)[:, -embeds.shape[1] :]
        out = self.g.model.llm(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            output_hidden_states=True,
            **{CACHE: past},
        )
        hidden = out.hidden_states[-1][:, -1:]
        logits = self.g.model.new_tokens.logits(hidden, out.logits[:, -1:])[:, -1]
        return logits, hidden[:, 0], getattr(out, CACHE)

    @torch.no_grad()
    def generate(
        self,
        requests: Sequence[Request],
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        decode: bool = True,
        out_path: Callable[[int, str, int], Path] | None = None,
    ) -> list[GenerationResult]:
        """One result per request. ``out_path(request index, modality, k)`` names the file of the
        k-th generated item of that modality (nothing is written when it is None)."""
        g = self.g
        start = time.perf_counter()
        tok = g.tokenizer
        embeds, mask, prompts = self._prefill_embeds(requests)
        rows = [
            _Row(GenerationResult(""), torch.Generator(device="cpu").manual_seed(r.seed)) for r in requests
        ]
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        logits, hidden, past = self._step(embeds, mask, None)
        while True:
            next_ids = []
            for i, row in enumerate(rows):
                next_ids.append(self._choose(row, logits[i], max_new_tokens, temperature, top_p, pad))
            if all(row.done for row in rows):
                break
            live = torch.tensor(
                [[0 if row.done else 1] for row in rows], dtype=mask.dtype, device=mask.device
            )
            mask = torch.cat([mask, live], dim=1)
            step = g.model.embed_tokens(torch.tensor(next_ids, device=g.device).unsqueeze(1))
            logits, hidden, past = self._step(step, mask, past)
            for i, row in enumerate(rows):
                self._after_step(row, hidden[i])
        llm_seconds = time.perf_counter() - start
        for row in rows:
            row.pieces.append(tok.decode(row.text_ids, skip_special_tokens=True))
            text = " ".join("".join(row.pieces).split())
            if text.endswith(g.template.stop):
                text = text[: -len(g.template.stop)].rstrip()
            row.result.text = text
            row.result.timing["llm"] = llm_seconds / len(rows)
        if decode:
            self._decode(rows, prompts, requests, out_path)
        for row in rows:
            row.result.seconds = (time.perf_counter() - start) / len(rows)
        return [row.result for row in rows]

    def _choose(
        self, row: _Row, logits: torch.Tensor, max_new_tokens: int, temperature: float, top_p: float, pad: int
    ) -> int:
        """The token this row feeds next (``pad`` once it is finished); updates the row's text and groups."""
        g, layout, res = self.g, self.g.model.layout, row.result
        row.fed = ""
        if row.done:
            return pad
        if row.queue:
            row.fed = "signal"
            res.new_tokens += 1
            return row.queue.pop(0)
        if res.new_tokens >= max_new_tokens:
            row.done = True
            return pad
        next_id = g._pick(logits, temperature, top_p, row.gen)
        if next_id == g.tokenizer.eos_token_id:
            row.done = True
            return pad
        res.new_tokens += 1
        name = layout.signal_modality(next_id)
        if not name:
            row.text_ids.append(next_id)
            row.fed = "text"
            return next_id
        feed = list(layout.signal_ids[name])
        if next_id != feed[0]:
            res.repaired_groups += 1
            convert = g.tokenizer.convert_ids_to_tokens
            res.notes.append(
                f"the {name} group began at {convert(next_id)}; completed from {convert(feed[0])}"
            )
        row.pieces += [
            g.tokenizer.decode(row.text_ids, skip_special_tokens=True),
            f" {modality_registry.get(name).placeholder} ",
        ]
        row.text_ids = []
        row.group = (name, [], feed)
        row.queue = feed[1:]
        res.signal_groups.append(name)
        row.fed = "signal"
        return feed[0]

    def _after_step(self, row: _Row, hidden: torch.Tensor) -> None:
        if row.fed == "signal" and row.group is not None:
            name, states, feed = row.group
            states.append(hidden)
            if not row.queue:
                row.groups.append((name, torch.stack(states), feed))
                row.group = None
        elif row.fed == "text" and self.g.tokenizer.decode(row.text_ids).rstrip().endswith(
            self.g.template.stop
        ):
            row.done = True

    # --- the decoders ----------------------------------------------------------------------
    def _decode(self, rows: list[_Row], prompts: list[str], requests: Sequence[Request], out_path) -> None:
        g = self.g
        by_modality: dict[str, list[tuple[int, int, torch.Tensor, list[int]]]] = {}
        for i, row in enumerate(rows):
            for k, (name, states, feed) in enumerate(row.groups):
                if name not in g.model.output_projectors:
                    row.result.notes.append(
                        f"the model emitted a {name} group but has no {name} decoder configured"
                    )
                    continue
                by_modality.setdefault(name, []).append((i, k, states, feed))
        for name, items in by_modality.items():
            t0 = time.perf_counter()
            mod = modality_registry.get(name)
            ids = torch.tensor([feed for _, _, _, feed in items], device=g.device)
            states = torch.stack([s for _, _, s, _ in items])
            cond = g.model.output_projectors[name](states + g.model.embed_tokens(ids).to(states.dtype))
            conditioner = g.conditioners[name].to(g.device)
            pipe = g.pipeline(name)
            out = pipe(
                **conditioner.pipeline_kwargs(cond, conditioner.negative(), pipe.dtype),
                generator=[
                    torch.Generator(device="cpu").manual_seed(requests[i].seed + k) for i, k, _, _ in items
                ],
                output_type="np",
                **dict(g.decoder(name).generate),
            )
            arrays = getattr(out, mod.pipeline_output)
            seconds = (time.perf_counter() - t0) / len(items)
            for j, (i, k, _, _) in enumerate(items):
                res = rows[i].result
                res.timing[name] = res.timing.get(name, 0.0) + seconds
                res.arrays.setdefault(name, []).append(arrays[j])
                if out_path is not None:
                    path = Path(out_path(i, name, len(res.files.get(name, []))))
                    path.parent.mkdir(parents=True, exist_ok=True)
                    meta = modality_registry.media_meta(
                        prompts[i],
                        res.text,
                        requests[i].seed + k,
                        str(g.bundle),
                        g.decoder(name).save,
                    )
                    res.files.setdefault(name, []).append(mod.write(arrays[j], path, pipe, meta))
