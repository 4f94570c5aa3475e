"""The tiny Llama: random weights of the real class, pre-trained for a few seconds on the embedded
corpus so that stage 1 has something to align to (a purely random LLM keeps near-uniform logits)."""

from __future__ import annotations

import random
from pathlib import Path

import torch
from tqdm import tqdm

from nextgpt.tiny.corpus import caption_conversations, tiny_corpus
from nextgpt.tiny.tokenizers import build_llm_tokenizer

LLM_HIDDEN = 64


def pretrain_tiny_llm(
    model,
    tokenizer,
    *,
    seed: int = 0,
    steps: int = 250,
    batch_size: int = 32,
    lr: float = 3e-3,
    texts: list[str] | None = None,
    desc: str | None = None,
) -> list[float]:
    """A few hundred language-modelling steps on ``tiny_corpus``: the tiny stand-in for Vicuna's pre-training.

    Why: a randomly initialised LLM predicts a near-uniform distribution whatever its input (logits
    of std ~0.1), so no soft prompt or projector can steer it, and stage-1 alignment would have
    nothing to align to. After this it knows the caption language and the Vicuna template, as the
    real frozen LLM knows English. Returns the loss curve (deterministic for a seed). ``texts``: other
    texts to train on (``nextgpt.world.llm`` continues with world turns); ``desc``: a progress bar.
    """
    rng = random.Random(seed)
    if texts is None:
        texts = tiny_corpus(seed + 1, n_sentences=3000)[3:] + caption_conversations(rng, 3000)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / 20) * max(0.05, 1 - i / steps)
    )
    losses = []
    side, tokenizer.padding_side = tokenizer.padding_side, "right"
    for _ in tqdm(range(steps), desc=desc, unit="step", disable=desc is None):
        batch = tokenizer(
            [rng.choice(texts) + tokenizer.eos_token for _ in range(batch_size)],
            padding=True,
            truncation=True,
            max_length=64,
            return_tensors="pt",
        )
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        with torch.random.fork_rng():
            torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
            loss = model(**batch, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    tokenizer.padding_side = side
    model.eval()
    return losses


def build_tiny_llm(out: Path, *, seed: int = 0) -> Path:
    """Tiny random LlamaForCausalLM (hidden 64, 2 layers) + trained Llama tokenizer, like Vicuna-7B.

    NExT-GPT's special tokens are NOT added: the project adds them at load time, as with the real Vicuna.
    """
    from transformers import (  # deferred: transformers costs ~1 s; only a build needs it
        LlamaConfig,
        LlamaForCausalLM,
    )

    out = Path(out)
    tokenizer = build_llm_tokenizer(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=LLM_HIDDEN,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    pretrain_tiny_llm(model, tokenizer, seed=seed)
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
