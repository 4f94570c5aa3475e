"""A tiny LLM that knows the world's language the way Vicuna knows English: its states at the end of
an answer say what was asked for, and it understands requests worded in ways no stage trains on.

The tiny LLM's pre-training (``nextgpt.tiny.llm``) has generation turns whose answers never depend on
the request ("Sure thing!"), so at the end of an answer, where NExT-GPT places the signal tokens, a
frozen tiny LLM holds nothing of the request, and stage 2 can only learn the mean target (measured:
held-out retrieval at chance). Vicuna's states there do carry the request. This continues the tiny
LLM's pre-training (the same class and files, loaded with ``from_pretrained`` and saved with
``save_pretrained``) on world turns whose answers do depend on their context:

- a request in one of many wordings, then a stock answer, then the request's content restated
  ("### Assistant: Sure thing! It is a red circle at the top left on a black background."): to
  predict the restatement the states after the stock answer must hold the request;
- a caption, then a question about one attribute, then its value ("... What colour is it? red.");
- the tiny corpus as before, so nothing it knew is lost.

The request wordings are :data:`PRETRAINING_REQUESTS`: none is a stage-training template
(``GENERATION_REQUESTS``; "Show me a ..." is close to one of the pair requests), and
:data:`HELD_OUT_REQUESTS` are in no training text at all, for testing that wordings never trained
on still work. Quality line: greedy restatement of held-out requests (worded as in
:data:`HELD_OUT_REQUESTS`), scored by the world's caption attributes.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from nextgpt.tiny.corpus import caption_conversations, tiny_corpus
from nextgpt.tiny.llm import pretrain_tiny_llm
from nextgpt.world import synthetic as syn
from nextgpt.world.attributes import ATTRIBUTES, caption_attributes

PRETRAINING_REQUESTS: tuple[str, ...] = (
    "Show me a {n} of {c}.",
    "Draw {c}.",
    "I would like a {n} of {c}.",
    "Give me a {n} of {c}, please.",
    "Can you make {c}?",
    "Let me see a {n} of {c}.",
    "Produce a {n} showing {c}.",
    "A {n} of {c}, please.",
    "Create {c} for me.",
    "Please generate a {n} with {c}.",
    "I need a {n} of {c}.",
    "Make a {n}: {c}.",
)
HELD_OUT_REQUESTS: tuple[str, ...] = (
    "Would you make a {n} of {c} for me?",
    "Send me a {n} of {c}.",
    "I wish to get a {n} of {c}.",
)
STOCK_ANSWERS: tuple[str, ...] = (
    "Sure thing!",
    "Sure.",
    "Of course!",
    "Certainly!",
    "No problem.",
    "Here you are.",
)
QUESTIONS: dict[str, str] = {
    "colour": "What colour is it?",
    "shape": "What shape is it?",
    "position": "Where is it?",
    "pitch": "What pitch is it?",
    "loudness": "How loud is it?",
    "pattern": "Is it steady or beeping?",
    "direction": "Which way does it move?",
}


def random_caption(rng: random.Random, modality: str) -> str:
    """A caption of the world grammar (one shape for images)."""
    if modality == "image":
        shape = (rng.choice(list(syn.COLOURS)), rng.choice(syn.SHAPES), rng.choice(list(syn.POSITIONS)))
        return syn.image_caption([shape], rng.choice(list(syn.BACKGROUNDS)))
    if modality == "audio":
        return syn.audio_caption(
            rng.choice(list(syn.LOUDNESS)), rng.choice(list(syn.PITCHES)), rng.choice(syn.PATTERNS)
        )
    return syn.video_caption(rng.choice(list(syn.COLOURS)), rng.choice(list(syn.DIRECTIONS)))


def request(
    rng: random.Random, modality: str, caption: str, wordings: tuple[str, ...] = PRETRAINING_REQUESTS
) -> str:
    return rng.choice(wordings).format(n=rng.choice(syn.GENERATION_NOUNS[modality]), c=caption)


def world_turns(rng: random.Random, n: int) -> list[str]:
    """``n`` Vicuna-v0 turns whose answers depend on their context (see the module docstring)."""
    out = []
    for _ in range(n):
        m = rng.choice(("image", "audio", "video"))
        c = random_caption(rng, m)
        if rng.random() < 0.6:
            out.append(
                f"### Human: {request(rng, m, c)}\n### Assistant: {rng.choice(STOCK_ANSWERS)} It is {c}.\n###"
            )
        else:
            attr = rng.choice(list(ATTRIBUTES[m]))
            value = caption_attributes(c, m)[attr]
            out.append(f"### Human: The {m} shows {c}. {QUESTIONS[attr]}\n### Assistant: {value}.\n###")
    return out


@dataclass(frozen=True)
class WorldLLMSettings:
    steps: int = 600
    batch: int = 32
    lr: float = 3e-3
    world_share: float = (
        0.7  # of the texts: world turns; the rest the tiny corpus and caption turns as before
    )
    heldout: int = 48
    seed: int = 0

    @classmethod
    def small(cls) -> WorldLLMSettings:
        return cls(steps=600, heldout=12)  # ~17 s: restates held-out requests (the learning test needs it)


def restatement_accuracy(model, tokenizer, n: int, seed: int) -> dict[str, float]:
    """Greedy answers to ``n`` held-out requests per modality (wordings never trained on): the share
    whose restatement names each attribute of the request."""
    rng = random.Random(seed)
    hits: dict[str, list[bool]] = {}
    model.eval()
    for m in ("image", "audio", "video"):
        for _ in range(n):
            c = random_caption(rng, m)
            prompt = f"### Human: {request(rng, m, c, HELD_OUT_REQUESTS)}\n### Assistant: Sure thing! It is"
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            with torch.no_grad():
                out = model.generate(
                    ids, max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.pad_token_id
                )
            said = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).split("\n")[0]
            for attr, value in caption_attributes(c, m).items():
                hits.setdefault(f"{m}/{attr}", []).append(caption_attributes(said, m)[attr] == value)
    return {k: sum(v) / len(v) for k, v in hits.items()}


def train_world_llm(model, tokenizer, settings: WorldLLMSettings = WorldLLMSettings()) -> dict:
    """Continue the tiny LLM's pre-training (in place) with world turns; returns the quality report."""
    start = time.perf_counter()
    before = restatement_accuracy(model, tokenizer, settings.heldout, settings.seed + 1001)
    rng = random.Random(settings.seed)
    old = tiny_corpus(settings.seed + 1, n_sentences=1500)[3:] + caption_conversations(rng, 1500)
    new = world_turns(rng, round(len(old) * settings.world_share / (1 - settings.world_share)))
    losses = pretrain_tiny_llm(
        model,
        tokenizer,
        seed=settings.seed,
        steps=settings.steps,
        batch_size=settings.batch,
        lr=settings.lr,
        texts=old + new,
        desc="world LLM",
    )
    after = restatement_accuracy(model, tokenizer, settings.heldout, settings.seed + 1001)
    return {
        "restatement_of_held_out_requests": after,
        "before": before,
        "final_loss": sum(losses[-20:]) / 20,
        "steps": settings.steps,
        "seconds": round(time.perf_counter() - start, 1),
    }


def build_world_llm(
    tiny_llm: str | Path, out: str | Path, settings: WorldLLMSettings = WorldLLMSettings()
) -> dict:
    """The tiny LLM at ``tiny_llm``, trained on the world, saved to ``out``; returns the report."""
    from transformers import (  # deferred: transformers costs ~1 s to import; only a build needs it
        AutoModelForCausalLM,
        AutoTokenizer,
    )

    torch.manual_seed(settings.seed)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llm)
    model = AutoModelForCausalLM.from_pretrained(tiny_llm)
    report = train_world_llm(model, tokenizer, settings)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return report
