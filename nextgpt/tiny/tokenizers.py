"""Tokenizers of the tiny backbones: a small deterministic BPE learner (the ``tokenizers`` trainer
breaks ties between equally frequent pairs in hash-map order, so two runs could learn different
merges), then the real transformers tokenizer classes (Llama, CLIP, RoBERTa) built from the
learned vocab/merges."""

from __future__ import annotations

import functools
import heapq
import json
import tempfile
from collections import Counter, defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from tokenizers import Regex, normalizers, pre_tokenizers

from nextgpt.tiny.corpus import tiny_corpus

if (
    TYPE_CHECKING
):  # heavy imports stay lazy: `python -m nextgpt.tiny --out DIR` on a complete cache is instant
    from transformers import CLIPTokenizer, LlamaTokenizer, PreTrainedTokenizerBase, RobertaTokenizer

TokT = TypeVar("TokT", bound="PreTrainedTokenizerBase")

LLM_VOCAB_TARGET = 1536
CLIP_VOCAB_TARGET = 1408
CLAP_VOCAB_TARGET = 1000
CLIP_MAX_LENGTH = 77
CLAP_MAX_LENGTH = 77


# --------------------------------------------------------------------------------------------------------
# Tokenizers: a small deterministic BPE learner (the `tokenizers` trainer breaks ties between equally
# frequent pairs in hash-map order, so two runs can learn different merges), then real transformers
# tokenizer classes built from the learned vocab/merges.
# --------------------------------------------------------------------------------------------------------

LLAMA_SPECIALS = ("<unk>", "<s>", "</s>")
CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
ROBERTA_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")
ROBERTA_MASK = "<mask>"
_CLIP_SPLIT = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode table (the byte-level BPE alphabet, in its canonical order)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=False))


def learn_bpe(
    words: dict[tuple[str, ...], int], max_merges: int, min_frequency: int = 2
) -> list[tuple[str, str]]:
    """Learn BPE merges from ``{symbols of a word: count}``; ties go to the lexicographically smallest pair.

    Why not ``tokenizers.trainers.BpeTrainer``: its tie-breaking depends on hash-map order, so the same
    corpus can give different merges run to run, which would break the byte-identical tiny builds.
    """
    seqs = [list(w) for w in words]
    freqs = list(words.values())
    counts: dict[tuple[str, str], int] = defaultdict(int)
    where: dict[tuple[str, str], set[int]] = defaultdict(set)
    for i, seq in enumerate(seqs):
        for pair in zip(seq, seq[1:], strict=False):
            counts[pair] += freqs[i]
            where[pair].add(i)
    heap = [(-c, pair) for pair, c in counts.items()]
    heapq.heapify(heap)
    merges: list[tuple[str, str]] = []
    while heap and len(merges) < max_merges:
        neg, pair = heapq.heappop(heap)
        current = counts.get(pair, 0)
        if current != -neg:  # stale entry: requeue with the up-to-date count
            if current > 0:
                heapq.heappush(heap, (-current, pair))
            continue
        if current < min_frequency:
            break
        merges.append(pair)
        a, b = pair
        new = a + b
        for i in sorted(where.pop(pair)):
            seq, f = seqs[i], freqs[i]
            for p in zip(seq, seq[1:], strict=False):
                counts[p] -= f
            out: list[str] = []
            j = 0
            while j < len(seq):
                if j + 1 < len(seq) and seq[j] == a and seq[j + 1] == b:
                    out.append(new)
                    j += 2
                else:
                    out.append(seq[j])
                    j += 1
            seqs[i] = out
            for p in zip(out, out[1:], strict=False):
                counts[p] += f
                where[p].add(i)
                heapq.heappush(heap, (-counts[p], p))
        counts.pop(pair, None)
    return merges


def _vocab_from(head: list[str], merges: list[tuple[str, str]], tail: list[str]) -> dict[str, int]:
    tokens = list(head)
    seen = set(tokens)
    for a, b in merges:
        if a + b not in seen:
            seen.add(a + b)
            tokens.append(a + b)
    tokens += [t for t in tail if t not in seen]
    return {t: i for i, t in enumerate(tokens)}


def write_vocab_merges(folder: Path, vocab: dict[str, int], merges: list[tuple[str, str]]) -> None:
    """vocab.json + merges.txt in the GPT-2/CLIP file format (merges start with ``#version: 0.2``)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _forget_load_kwargs(tokenizer: TokT) -> TokT:
    """Drop the loader's own kwargs (transformers 5 keeps them in init_kwargs and would save them)."""
    for key in ("is_local", "local_files_only", "_commit_hash", "cache_dir", "name_or_path"):
        tokenizer.init_kwargs.pop(key, None)
    return tokenizer


@functools.lru_cache(maxsize=4)
def _llama_vocab(seed: int) -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """LLaMA layout: <unk> <s> </s>, <0x00>..<0xFF> byte pieces, characters, then learned pieces (▁ = space)."""
    pre = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    words: Counter[tuple[str, ...]] = Counter()
    for text in tiny_corpus(seed):
        for piece, _ in pre.pre_tokenize_str(text):
            words[tuple(piece)] += 1
    chars = sorted({c for w in words for c in w})
    head = list(LLAMA_SPECIALS) + [f"<0x{i:02X}>" for i in range(256)] + chars
    merges = learn_bpe(words, max_merges=LLM_VOCAB_TARGET - len(head))
    return _vocab_from(head, merges, []), tuple(merges)


def build_llm_tokenizer(seed: int = 0) -> LlamaTokenizer:
    """A Llama-style BPE tokenizer (``LlamaTokenizer``: ▁ word marker, byte fallback) for the tiny LLM.

    Layout mirrors Vicuna/LLaMA: ``<unk>``=0, ``<s>``=1, ``</s>``=2, ``<0x00>``..``<0xFF>`` byte pieces,
    then learned pieces. Adds ``<s>`` at the start, no ``</s>``; pad is ``<unk>`` (what FastChat/LLaVA
    do with Vicuna, which has no pad token).
    """
    from transformers import (  # deferred: transformers costs ~1 s to import; only a build needs it
        LlamaTokenizer,
    )

    vocab, merges = _llama_vocab(seed)
    return LlamaTokenizer(
        vocab=dict(vocab),
        merges=list(merges),
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<unk>",
        add_bos_token=True,
        add_eos_token=False,
        model_max_length=1024,
        legacy=False,
    )


@functools.lru_cache(maxsize=4)
def clip_vocab(seed: int) -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """CLIP conventions: NFC + lowercase, byte-level alphabet, ``</w>`` end-of-word, specials last."""
    norm = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    pre = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    words: Counter[tuple[str, ...]] = Counter()
    for text in tiny_corpus(seed):
        for piece, _ in pre.pre_tokenize_str(norm.normalize_str(text)):
            words[tuple(piece[:-1]) + (piece[-1] + "</w>",)] += 1
    alphabet = list(_bytes_to_unicode().values())
    head = alphabet + [c + "</w>" for c in alphabet]
    merges = learn_bpe(words, max_merges=CLIP_VOCAB_TARGET - len(head) - 2)
    return _vocab_from(head, merges, [CLIP_BOS, CLIP_EOS]), tuple(merges)


def build_clip_tokenizer(seed: int = 0) -> CLIPTokenizer:
    """A real ``CLIPTokenizer`` (model_max_length 77) loaded from generated vocab.json/merges.txt files."""
    from transformers import (  # deferred: transformers costs ~1 s to import; only a build needs it
        CLIPTokenizer,
    )

    vocab, merges = clip_vocab(seed)
    with tempfile.TemporaryDirectory() as tmp:
        write_vocab_merges(Path(tmp), vocab, list(merges))
        return _forget_load_kwargs(CLIPTokenizer.from_pretrained(tmp, model_max_length=CLIP_MAX_LENGTH))


@functools.lru_cache(maxsize=4)
def roberta_vocab(seed: int) -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """GPT-2/RoBERTa conventions: byte-level BPE (Ġ = space), ``<s> <pad> </s> <unk>`` first, ``<mask>`` last."""
    pre = pre_tokenizers.ByteLevel(add_prefix_space=False)
    words: Counter[tuple[str, ...]] = Counter()
    for text in tiny_corpus(seed):
        for piece, _ in pre.pre_tokenize_str(text):
            words[tuple(piece)] += 1
    head = list(ROBERTA_SPECIALS) + list(_bytes_to_unicode().values())
    merges = learn_bpe(words, max_merges=CLAP_VOCAB_TARGET - len(head) - 1)
    return _vocab_from(head, merges, [ROBERTA_MASK]), tuple(merges)


def build_roberta_tokenizer(seed: int = 0) -> RobertaTokenizer:
    """A real ``RobertaTokenizer`` (CLAP's text tokenizer) loaded from generated vocab.json/merges.txt files."""
    from transformers import (  # deferred: transformers costs ~1 s to import; only a build needs it
        RobertaTokenizer,
    )

    vocab, merges = roberta_vocab(seed)
    with tempfile.TemporaryDirectory() as tmp:
        write_vocab_merges(Path(tmp), vocab, list(merges))
        return _forget_load_kwargs(RobertaTokenizer.from_pretrained(tmp, model_max_length=CLAP_MAX_LENGTH))
