"""Random TINY versions of every backbone NExT-GPT uses, built offline from configs.

Why: the real checkpoints (Vicuna-7B, Stable Diffusion 1.5, AudioLDM l-full, ZeroScope v2, ImageBind-huge)
can not be downloaded here and are far too big for CPU tests. Each builder below creates a randomly
initialised model of the *same classes* as the real one (LlamaForCausalLM, StableDiffusionPipeline,
AudioLDMPipeline, TextToVideoSDPipeline), with real trained tokenizers, and saves it with
``save_pretrained`` so the project loads it through exactly the same ``from_pretrained`` code path as the
real weights. Every width differs from the others (LLM 64, SD text 32, CLAP projection 16, T2V text 40)
so that tests can prove the project reads widths from the loaded configs instead of hard-coding them.

Usage: ``python -m nextgpt.tiny --out DIR [--force]`` (:mod:`nextgpt.tiny.__main__`) or :func:`build_all`.
The synthetic data set these models are tested on is written by :mod:`nextgpt.tiny.synthetic`.
"""
from __future__ import annotations

import contextlib
import functools
import heapq
import json
import os
import random
import shutil
import tempfile
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

TokT = TypeVar("TokT")

if TYPE_CHECKING:  # heavy imports stay lazy: `python -m nextgpt.tiny --out DIR` on a complete cache is instant
    from transformers import CLIPTokenizer, LlamaTokenizer, RobertaTokenizer

# Bump whenever anything below changes what is written: cached builds with another version are rebuilt.
TINY_BUILD_VERSION: str = "3"  # 3: the tiny LLM is pre-trained on tiny_corpus + caption turns

MARKER_NAME = ".complete"
IMAGEBIND_FILE = "imagebind_tiny.pth"

# Sizes of the tiny backbones (kept here so tests and docs can refer to them).
LLM_HIDDEN = 64
SD_TEXT_WIDTH = 32
AUDIOLDM_TEXT_HIDDEN = 24  # CLAP text transformer width; the conditioning width is the projection below
AUDIOLDM_PROJECTION_DIM = 16  # = AudioLDM conditioning width (text_embeds), like 512 for the real one
T2V_TEXT_WIDTH = 40
CLIP_MAX_LENGTH = 77
CLAP_MAX_LENGTH = 77

LLM_VOCAB_TARGET = 1536
CLIP_VOCAB_TARGET = 1408
CLAP_VOCAB_TARGET = 1000

# --------------------------------------------------------------------------------------------------------
# Embedded English corpus
# --------------------------------------------------------------------------------------------------------

_COLOURS = (
    "red green blue yellow orange purple pink white black grey gray brown cyan magenta violet "
    "gold silver teal navy beige maroon olive turquoise crimson"
).split()
_SHAPES = (
    "circle square triangle rectangle star heart diamond ellipse oval hexagon pentagon octagon cross "
    "line dot ring cube sphere ball box arrow spiral cylinder cone pyramid disc blob stripe grid"
).split()
_SIZES = "small large big tiny huge medium little giant thin thick wide narrow tall short".split()
_VPOS = "top bottom upper lower middle centre center".split()
_HPOS = "left right centre center middle".split()
_DIRECTIONS = "left right up down upwards downwards forward backward across around diagonally".split()
_MOTIONS = (
    "moving moves move sliding slides rotating rotates spinning spins bouncing bounces falling falls "
    "rising rises drifting drifts shrinking shrinks growing grows flashing flashes jumping jumps"
).split()
_SPEEDS = "slowly quickly fast steadily smoothly gradually suddenly".split()
_PITCH = "high low medium rising falling".split()
_LOUDNESS = "loud quiet soft faint gentle sharp steady".split()
_SOUNDS = (
    "tone beep beeping beeps hum humming buzz buzzing whistle whistling chirp chirping click clicking "
    "ring ringing chime chimes noise sound sounds siren bell drum note melody rhythm pulse pulses static"
).split()
_NUMBERS = "one two three four five six seven eight nine ten".split()
_MEDIA = "image picture photo photograph drawing video clip movie animation audio recording sound track".split()
_BACKGROUNDS = "white black grey dark light plain blank empty coloured colored striped".split()
_FUNCTION_WORDS = (
    "the a an of in on at to with and or but not no yes is are was were be been being it its this that "
    "these those there here which what where when who whom whose why how has have had do does did can could "
    "will would should shall may might must i you he she we they me him her us them my your his our their "
    "for from by as into onto over under above below between behind beside near far next then than so "
    "very too also just only some any all each every both few many much more most other another such same "
    "if because while after before during until about against through without within along again once "
    "now still already always never often sometimes please thank thanks sure okay well"
).split()
_VERBS = (
    "show shows shown showing generate generates generated create creates draw draws make makes give gives "
    "see sees hear hears listen watch describe describes describing tell tells explain play plays produce "
    "produces contains contain appears appear looks look sounds sound is happens depicts depict asked ask "
    "want wants like likes need needs help helps write writes answer answers caption captions"
).split()
_NOUNS = (
    "object objects shape shapes colour colours color colors position size background foreground scene "
    "frame frames second seconds moment time world people person man woman child dog cat bird car tree "
    "house water sky sun light music voice speech room street city field table window door question answer "
    "instruction request example description caption user assistant human model"
).split()
_ADJECTIVES = (
    "bright dark clear simple plain beautiful nice good bad new old first last next single double same "
    "different random empty full happy calm noisy silent smooth rough round sharp solid hollow"
).split()

_INSTRUCTIONS = (
    "Generate an image of {obj}.",
    "Please show me {obj}.",
    "Can you draw {obj}?",
    "Create a video of {obj} {motion}.",
    "Make a short video where {obj} is {motion}.",
    "Produce the sound of {snd}.",
    "Generate audio of {snd}.",
    "What is in this image?",
    "Describe this image.",
    "Describe the video.",
    "What do you hear in this audio?",
    "What sound is this?",
    "Tell me what happens in the video.",
    "Where is the {colour} {shape}?",
    "What colour is the {shape}?",
    "How many shapes are there?",
)
_ANSWERS = (
    "Sure thing! Here is {obj}.",
    "Sure! Here is the image you asked for.",
    "Here is a video of {obj} {motion}.",
    "Here is the audio: {snd}.",
    "The image shows {obj}.",
    "It shows {obj} on a {bg} background.",
    "The video shows {obj} {motion}.",
    "This is {snd}.",
    "I can hear {snd}.",
    "The {shape} is at the {vpos} {hpos}.",
    "The {shape} is {colour}.",
    "There are {num} shapes.",
)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def tiny_corpus(seed: int = 0, n_sentences: int = 4000) -> list[str]:
    """A small deterministic English corpus about shapes, colours, motion and sounds.

    Why: the tiny tokenizers must really tokenize the project's synthetic captions and the Vicuna
    prompt template into sensible subwords (not bytes), and must be trainable offline.
    """
    rng = random.Random(seed)
    pick = rng.choice

    def obj() -> str:
        size = pick(_SIZES) + " " if rng.random() < 0.5 else ""
        colour = pick(_COLOURS)
        first = (size or colour)
        phrase = f"{_article(first)} {size}{colour} {pick(_SHAPES)}"
        r = rng.random()
        if r < 0.4:
            phrase += f" at the {pick(_VPOS)} {pick(_HPOS)}"
        elif r < 0.6:
            phrase += f" in the {pick(_VPOS)}"
        elif r < 0.7:
            phrase += f" on the {pick(_HPOS)}"
        return phrase

    def motion() -> str:
        return f"{pick(_MOTIONS)} {pick(_DIRECTIONS)}" + (f" {pick(_SPEEDS)}" if rng.random() < 0.4 else "")

    def snd() -> str:
        r = rng.random()
        if r < 0.4:
            p = pick(_PITCH)
            return f"{_article(p)} {p} pitched {pick(_SOUNDS)}"
        if r < 0.7:
            loud = pick(_LOUDNESS)
            return f"{_article(loud)} {loud} {pick(_SOUNDS)} for {pick(_NUMBERS)} seconds"
        return f"{pick(_SOUNDS)} {pick(_SOUNDS)} with {pick(_LOUDNESS)} {pick(_SOUNDS)}"

    def fill(template: str) -> str:
        return template.format(
            obj=obj(), motion=motion(), snd=snd(), colour=pick(_COLOURS), shape=pick(_SHAPES),
            vpos=pick(_VPOS), hpos=pick(_HPOS), num=pick(_NUMBERS), bg=pick(_BACKGROUNDS),
        )

    def filler() -> str:
        words = [pick(_FUNCTION_WORDS), pick(_VERBS), pick(_FUNCTION_WORDS), pick(_ADJECTIVES), pick(_NOUNS)]
        if rng.random() < 0.5:
            words += [pick(_FUNCTION_WORDS), pick(_NOUNS)]
        s = " ".join(words)
        return s[0].upper() + s[1:] + pick([".", ".", "?", "!", ","])

    out: list[str] = []
    # every vocabulary word at least once, in several casings, so no word is left to bytes
    vocab_words = sorted(
        set(_COLOURS + _SHAPES + _SIZES + _VPOS + _HPOS + _DIRECTIONS + _MOTIONS + _SPEEDS + _PITCH
            + _LOUDNESS + _SOUNDS + _NUMBERS + _MEDIA + _BACKGROUNDS + _FUNCTION_WORDS + _VERBS + _NOUNS
            + _ADJECTIVES)
    )
    out.append(" ".join(vocab_words))
    out.append(" ".join(w.capitalize() for w in vocab_words))
    out.append("0 1 2 3 4 5 6 7 8 9 10 16 24 32 64 100 2024 . , ! ? : ; ' \" - ( ) [ ] < > / # * = + _ %")
    for _ in range(n_sentences):
        r = rng.random()
        if r < 0.35:  # plain captions, the project's synthetic data
            kind = rng.random()
            if kind < 0.45:
                s = obj()
            elif kind < 0.75:
                s = f"{obj()} {motion()}"
            else:
                s = snd()
            if rng.random() < 0.3:
                s = s[0].upper() + s[1:] + "."
        elif r < 0.7:  # Vicuna v0 conversation turns
            s = f"### Human: {fill(pick(_INSTRUCTIONS))}\n### Assistant: {fill(pick(_ANSWERS))}\n###"
        elif r < 0.85:
            s = f"{pick(['A', 'The', 'This', 'One'])} {pick(_MEDIA)} of {obj()}."
        else:
            s = filler()
        out.append(s)
    return out


# --------------------------------------------------------------------------------------------------------
# Tokenizers: a small deterministic BPE learner (the `tokenizers` trainer breaks ties between equally
# frequent pairs in hash-map order, so two runs can learn different merges), then real transformers
# tokenizer classes built from the learned vocab/merges.
# --------------------------------------------------------------------------------------------------------

LLAMA_SPECIALS = ("<unk>", "<s>", "</s>")
CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
ROBERTA_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")
ROBERTA_MASK = "<mask>"
_CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode table (the byte-level BPE alphabet, in its canonical order)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def learn_bpe(words: dict[tuple[str, ...], int], max_merges: int, min_frequency: int = 2) -> list[tuple[str, str]]:
    """Learn BPE merges from ``{symbols of a word: count}``; ties go to the lexicographically smallest pair.

    Why not ``tokenizers.trainers.BpeTrainer``: its tie-breaking depends on hash-map order, so the same
    corpus can give different merges run to run, which would break the byte-identical tiny builds.
    """
    seqs = [list(w) for w in words]
    freqs = list(words.values())
    counts: dict[tuple[str, str], int] = defaultdict(int)
    where: dict[tuple[str, str], set[int]] = defaultdict(set)
    for i, seq in enumerate(seqs):
        for pair in zip(seq, seq[1:]):
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
            for p in zip(seq, seq[1:]):
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
            for p in zip(out, out[1:]):
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


def _write_vocab_merges(folder: Path, vocab: dict[str, int], merges: list[tuple[str, str]]) -> None:
    """vocab.json + merges.txt in the GPT-2/CLIP file format (merges start with ``#version: 0.2``)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _forget_load_kwargs(tokenizer: "TokT") -> "TokT":
    """Drop the loader's own kwargs (transformers 5 keeps them in init_kwargs and would save them)."""
    for key in ("is_local", "local_files_only", "_commit_hash", "cache_dir", "name_or_path"):
        tokenizer.init_kwargs.pop(key, None)
    return tokenizer


@functools.lru_cache(maxsize=4)
def _llama_vocab(seed: int) -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """LLaMA layout: <unk> <s> </s>, <0x00>..<0xFF> byte pieces, characters, then learned pieces (▁ = space)."""
    from tokenizers import pre_tokenizers

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
    from transformers import LlamaTokenizer

    vocab, merges = _llama_vocab(seed)
    return LlamaTokenizer(
        vocab=dict(vocab), merges=list(merges), unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        pad_token="<unk>", add_bos_token=True, add_eos_token=False, model_max_length=1024, legacy=False,
    )


@functools.lru_cache(maxsize=4)
def _clip_vocab(seed: int) -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """CLIP conventions: NFC + lowercase, byte-level alphabet, ``</w>`` end-of-word, specials last."""
    from tokenizers import Regex, normalizers, pre_tokenizers

    norm = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    pre = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
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
    from transformers import CLIPTokenizer

    vocab, merges = _clip_vocab(seed)
    with tempfile.TemporaryDirectory() as tmp:
        _write_vocab_merges(Path(tmp), vocab, list(merges))
        return _forget_load_kwargs(CLIPTokenizer.from_pretrained(tmp, model_max_length=CLIP_MAX_LENGTH))


@functools.lru_cache(maxsize=4)
def _roberta_vocab(seed: int) -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """GPT-2/RoBERTa conventions: byte-level BPE (Ġ = space), ``<s> <pad> </s> <unk>`` first, ``<mask>`` last."""
    from tokenizers import pre_tokenizers

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
    from transformers import RobertaTokenizer

    vocab, merges = _roberta_vocab(seed)
    with tempfile.TemporaryDirectory() as tmp:
        _write_vocab_merges(Path(tmp), vocab, list(merges))
        return _forget_load_kwargs(RobertaTokenizer.from_pretrained(tmp, model_max_length=CLAP_MAX_LENGTH))


# --------------------------------------------------------------------------------------------------------
# Backbones
# --------------------------------------------------------------------------------------------------------


def caption_conversations(rng: random.Random, n: int) -> list[str]:
    """Vicuna-v0 turns whose answers are captions of the project's synthetic grammar.

    Why: the real Vicuna has read plenty of text like CC3M captions; the tiny one reads these.
    Media placeholders are left out (the base tokenizer has no <Img> token, like Vicuna's).
    """
    from nextgpt.tiny import synthetic as syn

    def caption() -> str:
        kind = rng.random()
        if kind < 0.4:
            shapes = [(rng.choice(list(syn.COLOURS)), rng.choice(syn.SHAPES), rng.choice(list(syn.POSITIONS)))]
            return syn.image_caption(shapes, rng.choice(list(syn.BACKGROUNDS)))
        if kind < 0.7:
            return syn.audio_caption(rng.choice(list(syn.LOUDNESS)), rng.choice(list(syn.PITCHES)), rng.choice(syn.PATTERNS))
        return syn.video_caption(rng.choice(list(syn.COLOURS)), rng.choice(list(syn.DIRECTIONS)))

    out = []
    for _ in range(n):
        m = rng.choice(("image", "audio", "video"))
        if rng.random() < 0.5:
            q = rng.choice(syn.COMPREHENSION_INSTRUCTIONS).format(m=m)
            out.append(f"### Human: {q}\n### Assistant: {caption()}\n###")
        else:
            q = rng.choice(syn.GENERATION_REQUESTS).format(n=rng.choice(syn.GENERATION_NOUNS[m]), c=caption())
            a = rng.choice(syn.GENERATION_ANSWERS).format(m=m).replace(f"<{m}>", "").strip()
            out.append(f"### Human: {q}\n### Assistant: {a}\n###")
    return out


def pretrain_tiny_llm(model, tokenizer, *, seed: int = 0, steps: int = 250, batch_size: int = 32, lr: float = 3e-3) -> list[float]:
    """A few hundred language-modelling steps on ``tiny_corpus``: the tiny stand-in for Vicuna's pre-training.

    Why: a randomly initialised LLM predicts a near-uniform distribution whatever its input (logits
    of std ~0.1), so no soft prompt or projector can steer it, and stage-1 alignment would have
    nothing to align to. After this it knows the caption language and the Vicuna template, as the
    real frozen LLM knows English. Returns the loss curve (deterministic for a seed).
    """
    import torch

    rng = random.Random(seed)
    texts = tiny_corpus(seed + 1, n_sentences=3000)[3:] + caption_conversations(rng, 3000)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / 20) * max(0.05, 1 - i / steps))
    losses = []
    side, tokenizer.padding_side = tokenizer.padding_side, "right"
    for _ in range(steps):
        batch = tokenizer([rng.choice(texts) + tokenizer.eos_token for _ in range(batch_size)], padding=True,
                          truncation=True, max_length=64, return_tensors="pt")
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
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

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


def _clip_text_encoder(tokenizer, width: int, seed: int):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=2 * width,
        projection_dim=width,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=CLIP_MAX_LENGTH,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return CLIPTextModel(config).eval()


def _image_vae(seed: int):
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, sample_size=32,
    ).eval()


def build_tiny_stable_diffusion(out: Path, *, seed: int = 0) -> Path:
    """Tiny StableDiffusionPipeline (CLIP text width 32, 77 positions, PNDM like SD 1.5, 32x32 images)."""
    import torch
    from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    out = Path(out)
    tokenizer = build_clip_tokenizer(seed)
    text_encoder = _clip_text_encoder(tokenizer, SD_TEXT_WIDTH, seed)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
        cross_attention_dim=SD_TEXT_WIDTH, attention_head_dim=4,
    ).eval()
    vae = _image_vae(seed)
    scheduler = PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(out)
    _add_vocab_files(out / "tokenizer", seed, clip=True)
    return out


def build_tiny_audioldm(out: Path, *, seed: int = 0) -> Path:
    """Tiny AudioLDMPipeline: CLAP text (projection_dim 16 = conditioning width), DDIM like l-full.

    Output-length arithmetic (as in AudioLDMPipeline): one mel frame = prod(upsample_rates)/sampling_rate
    = 16/16000 s; the VAE halves the mel grid (vae_scale_factor 2) and the mel has 16 bins = vocoder
    model_in_dim; unet sample_size 32 gives a default of 32*2 frames = 0.064 s = 1024 samples.
    """
    import torch
    from diffusers import AudioLDMPipeline, AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import (
        ClapTextConfig,
        ClapTextModelWithProjection,
        SpeechT5HifiGan,
        SpeechT5HifiGanConfig,
    )

    out = Path(out)
    tokenizer = build_roberta_tokenizer(seed)
    text_config = ClapTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=AUDIOLDM_TEXT_HIDDEN,
        intermediate_size=2 * AUDIOLDM_TEXT_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=CLAP_MAX_LENGTH + 3,  # RoBERTa positions start at pad_token_id + 1
        projection_dim=AUDIOLDM_PROJECTION_DIM,
        layer_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    text_encoder = ClapTextModelWithProjection(text_config).eval()
    mel_bins = 16
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=8, out_channels=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
        # AudioLDM has no text cross-attention: its attention blocks self-attend (cross dim = block width)
        # and the CLAP embedding enters as a class embedding concatenated to the time embedding.
        cross_attention_dim=(16, 32), attention_head_dim=4,
        class_embed_type="simple_projection",
        projection_class_embeddings_input_dim=AUDIOLDM_PROJECTION_DIM,
        class_embeddings_concat=True,
    ).eval()
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=1, out_channels=1, latent_channels=8,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, sample_size=64,
    ).eval()
    torch.manual_seed(seed)
    vocoder = SpeechT5HifiGan(SpeechT5HifiGanConfig(
        model_in_dim=mel_bins, sampling_rate=16000, upsample_initial_channel=16, upsample_rates=[4, 4],
        upsample_kernel_sizes=[8, 8], resblock_kernel_sizes=[3], resblock_dilation_sizes=[[1, 3]],
        normalize_before=False, initializer_range=0.1,  # 0.1: waveform amplitude ~0.1 instead of ~1e-5
    )).eval()
    scheduler = DDIMScheduler(
        beta_start=0.0015, beta_end=0.0195, beta_schedule="scaled_linear", num_train_timesteps=1000,
        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    )
    pipe = AudioLDMPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler, vocoder=vocoder,
    )
    pipe.save_pretrained(out)
    _add_vocab_files(out / "tokenizer", seed, clip=False)
    return out


def build_tiny_text_to_video(out: Path, *, seed: int = 0) -> Path:
    """Tiny TextToVideoSDPipeline (UNet3D, CLIP text width 40, 77 positions, DPM-Solver++ like ZeroScope)."""
    import torch
    from diffusers import DPMSolverMultistepScheduler, TextToVideoSDPipeline, UNet3DConditionModel

    out = Path(out)
    tokenizer = build_clip_tokenizer(seed)
    text_encoder = _clip_text_encoder(tokenizer, T2V_TEXT_WIDTH, seed)
    torch.manual_seed(seed)
    unet = UNet3DConditionModel(
        sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
        cross_attention_dim=T2V_TEXT_WIDTH, attention_head_dim=8,
    ).eval()
    vae = _image_vae(seed)
    scheduler = DPMSolverMultistepScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        steps_offset=1,
    )
    pipe = TextToVideoSDPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)
    pipe.save_pretrained(out)
    _add_vocab_files(out / "tokenizer", seed, clip=True)
    return out


def _add_vocab_files(folder: Path, seed: int, *, clip: bool) -> None:
    """Write vocab.json/merges.txt beside tokenizer.json when save_pretrained did not (transformers 5)."""
    if (folder / "vocab.json").exists() and (folder / "merges.txt").exists():
        return
    vocab, merges = _clip_vocab(seed) if clip else _roberta_vocab(seed)
    _write_vocab_merges(folder, vocab, list(merges))


# --------------------------------------------------------------------------------------------------------
# All of them, cached
# --------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_progress() -> Iterator[None]:
    """Hide transformers' per-save "Writing model shards" bars during a build, then restore the setting."""
    from transformers.utils import logging as hf_logging

    was_disabled = hf_logging.is_progress_bar_enabled() is False
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if not was_disabled:
            hf_logging.enable_progress_bar()


def _paths(out: Path) -> dict[str, Path]:
    return {
        "llm": out / "llm",
        "sd": out / "sd",
        "audioldm": out / "audioldm",
        "t2v": out / "t2v",
        "imagebind": out / "imagebind" / IMAGEBIND_FILE,
    }


def imagebind_fingerprint() -> str:
    """Short hash of the tiny ImageBind's state-dict layout (names + shapes).

    Why: ``nextgpt/encoders/imagebind.py`` evolves separately from this file; when its tiny layout
    changes, a cached ``imagebind_tiny.pth`` would no longer load, so the cache must be rebuilt.
    Built on the meta device: no memory, and the global RNG is left untouched.
    """
    import hashlib

    import torch

    from nextgpt.encoders.imagebind import ImageBindModel

    cfg = tiny_imagebind_config()
    try:
        with torch.device("meta"):
            layout = sorted((k, tuple(v.shape)) for k, v in ImageBindModel(cfg).state_dict().items())
    except Exception:  # a model that can not be built on meta: fall back to its config
        layout = [("config", repr(cfg))]
    return hashlib.sha1(repr(layout).encode()).hexdigest()[:12]


def tiny_imagebind_config():
    """The tiny ImageBind with every branch, as ``imagebind_huge.pth`` holds every branch: a model
    config that reads depth maps builds the depth trunk and finds its weights in the same file."""
    import dataclasses

    from nextgpt.encoders.imagebind import BRANCHES, ImageBindConfig

    return dataclasses.replace(ImageBindConfig.tiny(), modalities=BRANCHES)


def _marker_text() -> str:
    return f"{TINY_BUILD_VERSION}\nimagebind {imagebind_fingerprint()}\n"


def is_complete(out: Path) -> bool:
    """True when `out` holds a finished build of this TINY_BUILD_VERSION and of the current tiny ImageBind.

    The marker's first line is TINY_BUILD_VERSION; the second, the ImageBind layout fingerprint.
    """
    marker = Path(out) / MARKER_NAME
    try:
        lines = marker.read_text(encoding="utf-8").splitlines()
    except OSError:
        return False
    if not lines or lines[0].strip() != TINY_BUILD_VERSION:
        return False
    return f"imagebind {imagebind_fingerprint()}" in (line.strip() for line in lines[1:])


def _build_imagebind(path: Path, seed: int) -> None:
    import torch

    from nextgpt.encoders.imagebind import ImageBindModel  # written by another module

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = ImageBindModel(tiny_imagebind_config())
    torch.save(model.state_dict(), path)


def build_all(out: Path, *, force: bool = False) -> dict[str, Path]:
    """Build every tiny backbone under `out` once (cached by the `.complete` marker) and return their paths.

    The build happens in a temporary folder beside `out` that is renamed into place at the end, so an
    interrupted build never leaves a half cache, and concurrent builders never see one.
    """
    out = Path(out).absolute()
    paths = _paths(out)
    if not force and is_complete(out):
        return paths
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".building", dir=out.parent))
    try:
        tmp_paths = _paths(tmp)
        with _quiet_progress():
            build_tiny_llm(tmp_paths["llm"], seed=0)
            build_tiny_stable_diffusion(tmp_paths["sd"], seed=0)
            build_tiny_audioldm(tmp_paths["audioldm"], seed=0)
            build_tiny_text_to_video(tmp_paths["t2v"], seed=0)
            _build_imagebind(tmp_paths["imagebind"], seed=0)
        (tmp / MARKER_NAME).write_text(_marker_text(), encoding="utf-8")
        if out.exists():
            if not force and is_complete(out):  # another process finished first: keep theirs
                shutil.rmtree(tmp, ignore_errors=True)
                return paths
            old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(out, old)
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.replace(tmp, out)
        except OSError:
            if is_complete(out):  # lost a race to a concurrent builder
                shutil.rmtree(tmp, ignore_errors=True)
                return paths
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return paths
