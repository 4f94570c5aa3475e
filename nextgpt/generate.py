"""Any-to-any generation from a stage bundle: text + any media in, text + generated media out.

Decoding runs with the KV cache on (greedy, or sampled with temperature / top-p, seeded). When
the model emits a signal token of a modality, the rest of that modality's group is forced; a
group that starts mid-way (say ``[IMG2]`` first) is repaired the same way and reported in the
result's notes, so malformed output never crashes. The group's hidden states go through the
modality's output projector into its decoder pipeline via ``prompt_embeds``, with classifier-free
guidance against the decoder's embedding of the empty prompt. Pipelines load once and are reused.

    python -m nextgpt.generate --bundle bundles/stage3 --prompt "Please make an image of a red circle" --out outputs/gen
    python -m nextgpt.generate --bundle bundles/stage3 --prompt "Describe this image." --image photo.jpg
    python -m nextgpt.generate --bundle bundles/stage3 --interactive
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

from nextgpt import modality as modality_registry
from nextgpt.batch import collate_conversations
from nextgpt.bundles import BundleError, load_bundle_config, load_bundle_weights
from nextgpt.decoders import load_pipeline
from nextgpt.model import build_nextgpt, torch_dtype
from nextgpt.model_spec import DecoderSpec, ModelSpec
from nextgpt.prompts import Conversation, placeholder_pattern, resolve_template
from nextgpt.stages import STAGES

log = logging.getLogger(__name__)


def _cache_field() -> str:
    """transformers 5 renamed ``past_key_values`` to ``cache`` (argument and output field)."""
    return "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


CACHE = _cache_field()


class GenerationInputError(ValueError):
    """A request that can not be served: the message says what to change."""


@dataclass
class GenerationResult:
    text: str
    files: dict[str, list[Path]] = field(default_factory=dict)
    arrays: dict[str, list[np.ndarray]] = field(default_factory=dict)
    signal_groups: list[str] = field(default_factory=list)  # modality of each group emitted, in order
    notes: list[str] = field(default_factory=list)  # repaired or unusable groups, in words
    repaired_groups: int = 0
    new_tokens: int = 0
    prompt_tokens: int = 0
    finish_reason: str = "stop"  # "length" when max_new_tokens ended the answer
    seconds: float = 0.0
    timing: dict[str, float] = field(default_factory=dict)  # "llm" and one entry per decoder


def modality_of_file(path: str | Path) -> str:
    suffix = Path(path).suffix.lower()
    for name in modality_registry.names():
        if suffix in modality_registry.get(name).extensions:
            return name
    known = sorted(e for n in modality_registry.names() for e in modality_registry.get(n).extensions)
    raise GenerationInputError(f"{path}: unsupported media type {suffix!r}; supported: {known}")


DECODING_DEFAULTS: dict[str, Any] = {"max_new_tokens": 64, "temperature": 0.0, "top_p": 1.0}


class Generator:
    """A NextGPT model ready to answer, plus its decoder pipelines (loaded once, on first use)."""

    def __init__(
        self,
        bundle: str | Path,
        device: str = "cpu",
        *,
        weights: str | Path | None = None,
        backbones: str | Path | None = None,
    ):
        self.bundle = Path(bundle)
        if not (self.bundle / "trainable.safetensors").is_file():
            raise BundleError(f"{self.bundle} is not a stage bundle (train.py writes bundles/stage<N>/)")
        cfg = load_bundle_config(self.bundle, weights=weights, backbones=backbones)
        self.stage = int(cfg.stage.number)
        spec = ModelSpec.from_config(cfg.model)
        model, tokenizer, conditioners = build_nextgpt(spec)
        if STAGES[self.stage].use_lora:
            model.apply_lora(spec.need_lora())
        loaded = load_bundle_weights(self.bundle, model, spec)
        self._setup(model, tokenizer, conditioners, spec, device)
        self.untrained = sorted(
            {
                n.split(".")[1]
                for n, _ in model.named_parameters()
                if n.startswith("output_projectors.") and n not in loaded
            }
        )
        if self.untrained:
            log.warning(
                "bundle %s (stage %d) has no trained output projector for %s: generated media will be noise",
                self.bundle,
                self.stage,
                self.untrained,
            )

    @classmethod
    def from_model(
        cls,
        model,
        tokenizer,
        conditioners,
        spec: ModelSpec,
        device: str | torch.device = "cpu",
        bundle: str = "<in training>",
    ) -> Generator:
        """Wrap a model that is already built (e.g. the one being trained, for sample logging)."""
        self = cls.__new__(cls)
        self.bundle, self.stage, self.untrained = Path(bundle), -1, []
        self._setup(model, tokenizer, conditioners, spec, device)
        return self

    def decoding_defaults(self) -> dict[str, Any]:
        """``model.generation`` of the bundle's config (``experiment=nextgpt_legacy`` samples as the
        original's inference.py does), over greedy decoding of 64 tokens."""
        given = self.spec.generation.as_dict() if self.spec.generation is not None else {}
        return {**DECODING_DEFAULTS, **{k: given[k] for k in DECODING_DEFAULTS if given.get(k) is not None}}

    def _setup(self, model, tokenizer, conditioners, spec: ModelSpec, device) -> None:
        self.spec = spec
        self.model, self.tokenizer, self.conditioners = model.to(device).eval(), tokenizer, conditioners
        self.device = torch.device(device)
        self.template = resolve_template(spec.llm.template, tokenizer)
        self.num_media_tokens = spec.input_projector.num_tokens
        self.max_context = int(
            getattr(self.model.llm.config.get_text_config(), "max_position_embeddings", 2048)
        )
        self.pipelines: dict = {}

    def decoder(self, name: str) -> DecoderSpec:
        """The decoder of a generated modality (a KeyError for an input-only one)."""
        return self.spec.generated[name]

    def pipeline(self, name: str):
        if name not in self.pipelines:
            dec = self.decoder(name)
            self.pipelines[name] = load_pipeline(dec.path, torch_dtype(dec.dtype), self.device)
        return self.pipelines[name]

    # --- the LLM -----------------------------------------------------------------------------
    def _step(self, embeds: torch.Tensor, past):
        out = self.model.llm(inputs_embeds=embeds, use_cache=True, output_hidden_states=True, **{CACHE: past})
        hidden = out.hidden_states[-1]
        logits = self.model.new_tokens.logits(hidden[:, -1:], out.logits[:, -1:])[0, -1]
        return logits, hidden[0], getattr(out, CACHE)

    def _pick(self, logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> int:
        if temperature <= 0:
            return int(logits.argmax())
        probs = torch.softmax(logits.float().cpu() / temperature, -1)
        if top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            keep = sorted_p.cumsum(0) - sorted_p < top_p
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
        return int(torch.multinomial(probs / probs.sum(), 1, generator=gen))

    def _encode_prompt(self, conv: Conversation):
        batch = collate_conversations(
            [conv],
            self.tokenizer,
            self.model.layout,
            self.template.name,
            num_media_tokens=self.num_media_tokens,
            max_length=10**9,
            device=self.device,
        )
        length = batch["input_ids"].shape[1]
        if length >= self.max_context:
            raise GenerationInputError(
                f"the conversation is {length} tokens; this model reads at most "
                f"{self.max_context}: shorten the prompt or start a new conversation"
            )
        return self.model.embed_inputs(
            batch["input_ids"], batch["media_mask"], batch["media"], batch["media_sequence"]
        )

    @torch.no_grad()
    def chat(
        self,
        prompt: str,
        media: Sequence[str | Path] = (),
        history: Sequence[tuple[str, str]] = (),
        *,
        history_media: Sequence[str | Path] = (),
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        use_cache: bool = True,
        out_dir: str | Path | None = None,
        decode: bool = True,
        ignore_eos: bool = False,
        on_text: Callable[[str], None] | None = None,
    ) -> GenerationResult:
        """Answer ``prompt`` about ``media`` after ``history`` (earlier (human, answer) turns whose
        placeholders refer, in order, to ``history_media``). Media without a placeholder in the
        prompt are put in front of it. ``use_cache=False`` and ``ignore_eos`` exist for benchmarks."""
        if not prompt or not prompt.strip():
            raise GenerationInputError("the prompt is empty: type a question or a request")
        start = time.perf_counter()
        prompt = with_placeholders(prompt, media)
        media_in = [(modality_of_file(p), str(p)) for p in [*history_media, *media]]
        for _, path in media_in:
            if not Path(path).is_file():
                raise GenerationInputError(f"{path}: no such media file")
        # placeholders in earlier answers were generated media: re-read as their signal groups
        captions_out = [(m.group(1), "") for _, a in history for m in placeholder_pattern().finditer(a)]
        conv = Conversation("prompt", [*history, (prompt, "")], media_in=media_in, captions_out=captions_out)
        embeds = self._encode_prompt(conv)
        layout = self.model.layout
        gen = torch.Generator(device="cpu").manual_seed(seed)
        result = GenerationResult("", prompt_tokens=int(embeds.shape[1]))
        text_ids: list[int] = []
        pieces: list[str] = []
        groups: list[tuple[str, torch.Tensor, list[int]]] = []
        all_embeds = embeds
        t_llm = time.perf_counter()
        logits, _, past = self._step(embeds, None)
        result.finish_reason = "length"
        while result.new_tokens < max_new_tokens:
            next_id = self._pick(logits, temperature, top_p, gen)
            if next_id == self.tokenizer.eos_token_id and not ignore_eos:
                result.finish_reason = "stop"
                break
            name = layout.signal_modality(next_id)
            feed = list(layout.signal_ids[name]) if name else [next_id]
            if name and next_id != feed[0]:
                result.repaired_groups += 1
                token = self.tokenizer.convert_ids_to_tokens(next_id)
                result.notes.append(
                    f"the {name} group began at {token}; completed from {self.tokenizer.convert_ids_to_tokens(feed[0])}"
                )
            step_embeds = self.model.embed_tokens(torch.tensor([feed], device=self.device))
            if use_cache:
                logits, hidden, past = self._step(step_embeds, past)
            else:  # the whole sequence again: only for measuring what the cache saves
                all_embeds = torch.cat([all_embeds, step_embeds.to(all_embeds.dtype)], dim=1)
                logits, hidden, _ = self._step(all_embeds, None)
            result.new_tokens += len(feed)
            if name:
                pieces += [
                    self.tokenizer.decode(text_ids, skip_special_tokens=True),
                    f" {modality_registry.get(name).placeholder} ",
                ]
                text_ids = []
                groups.append((name, hidden[-len(feed) :], feed))
                result.signal_groups.append(name)
            else:
                text_ids.append(next_id)
                if not ignore_eos and self.tokenizer.decode(text_ids).rstrip().endswith(self.template.stop):
                    result.finish_reason = "stop"
                    break
            if on_text is not None:
                on_text(self._answer_text(pieces, text_ids))
        result.timing["llm"] = time.perf_counter() - t_llm
        result.text = self._answer_text(pieces, text_ids)
        if decode:
            self._decode_groups(result, groups, prompt, seed, out_dir)
        result.seconds = time.perf_counter() - start
        return result

    def _answer_text(self, pieces: list[str], text_ids: list[int]) -> str:
        """The answer so far: text pieces and placeholders, whitespace collapsed, the stop string cut."""
        text = " ".join("".join([*pieces, self.tokenizer.decode(text_ids, skip_special_tokens=True)]).split())
        if text.endswith(self.template.stop):
            text = text[: -len(self.template.stop)].rstrip()
        return text

    def _decode_groups(self, result: GenerationResult, groups, prompt: str, seed: int, out_dir) -> None:
        for k, (name, hidden, feed) in enumerate(groups):
            if name not in self.model.output_projectors:
                result.notes.append(f"the model emitted a {name} group but has no {name} decoder configured")
                continue
            t0 = time.perf_counter()
            array = self.decode_group(name, hidden, feed, seed + k)
            result.timing[name] = result.timing.get(name, 0.0) + time.perf_counter() - t0
            result.arrays.setdefault(name, []).append(array)
            if out_dir is not None:
                mod = modality_registry.get(name)
                out = Path(out_dir)
                out.mkdir(parents=True, exist_ok=True)
                meta = modality_registry.media_meta(
                    prompt, result.text, seed + k, str(self.bundle), self.decoder(name).save
                )
                path = out / f"{name}_{k}{mod.output_suffix}"
                result.files.setdefault(name, []).append(mod.write(array, path, self.pipeline(name), meta))

    def decode_group(self, name: str, hidden: torch.Tensor, feed: list[int], seed: int) -> np.ndarray:
        """One signal group's hidden states -> output projector -> decoder pipeline -> array."""
        ids = torch.tensor(feed, device=self.device)
        states = hidden + self.model.embed_tokens(ids).to(hidden.dtype)
        return self.decode_conditioning(name, self.model.output_projectors[name](states.unsqueeze(0)), seed)

    def decode_caption(self, name: str, caption: str, seed: int) -> np.ndarray:
        """The decoder alone, conditioned on ``caption`` through its own text encoder: what the
        output projector's conditioning is trained to match (the ceiling of generation through it)."""
        conditioner = self.conditioners[name].to(self.device)
        with torch.no_grad():
            return self.decode_conditioning(name, conditioner.encode([caption]), seed)

    def decode_conditioning(self, name: str, cond: torch.Tensor, seed: int) -> np.ndarray:
        """A decoder pipeline run on one conditioning (its text encoder's space), as an array."""
        conditioner = self.conditioners[name].to(self.device)
        pipe = self.pipeline(name)
        out = pipe(
            **conditioner.pipeline_kwargs(cond, conditioner.negative(), pipe.dtype),
            generator=torch.Generator(device="cpu").manual_seed(seed),
            output_type="np",
            **dict(self.decoder(name).generate),
        )
        return np.asarray(getattr(out, modality_registry.get(name).pipeline_output)[0])


def with_placeholders(prompt: str, media: Sequence[str | Path]) -> str:
    """Put a placeholder in front of the prompt for each attached file it does not mention
    (the training data's "<image>\\nquestion" layout)."""
    counts = {n: prompt.count(modality_registry.get(n).placeholder) for n in modality_registry.names()}
    front = []
    for p in media:
        name = modality_of_file(p)
        if counts[name]:
            counts[name] -= 1
        else:
            front.append(modality_registry.get(name).placeholder)
    return "\n".join([" ".join(front), prompt]) if front else prompt


class ChatSession:
    """A multi-turn conversation: keeps the turns and every media file attached so far."""

    def __init__(self, generator: Generator, out_dir: str | Path | None = None, **options: Any):
        self.generator, self.out_dir, self.options = generator, out_dir, options
        self.turns: list[tuple[str, str]] = []
        self.media: list[str] = []

    def ask(self, prompt: str, media: Sequence[str | Path] = (), **options: Any) -> GenerationResult:
        out = Path(self.out_dir) / f"turn{len(self.turns)}" if self.out_dir is not None else None
        prompt_full = with_placeholders(prompt, media)
        res = self.generator.chat(
            prompt_full,
            media,
            self.turns,
            history_media=self.media,
            out_dir=out,
            **{**self.options, **options},
        )
        self.turns.append((prompt_full, res.text))
        self.media += [str(p) for p in media]
        return res

    def reset(self) -> None:
        self.turns, self.media = [], []


# --- command line ------------------------------------------------------------------------------
def _describe(i: int, prompt: str, res: GenerationResult) -> str:
    files = {k: [str(f) for f in v] for k, v in res.files.items()}
    lines = [
        f"[{i}] {prompt!r}",
        f"    -> {res.text!r}",
        f"    files: {files or 'none'} ({res.seconds:.1f} s, "
        f"{res.new_tokens} tokens, {res.repaired_groups} repaired groups)",
    ]
    lines += [f"    note: {n}" for n in res.notes]
    return "\n".join(lines)


def _interactive(gen: Generator, args) -> int:
    session = ChatSession(
        gen,
        args.out,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
    )
    pending: list[str] = list(args.media)
    print("chat: type a message; /image F, /audio F, /video F attach a file; /reset; /quit")
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            return 0
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return 0
        if line == "/reset":
            session.reset()
            pending = []
            print("(new conversation)")
            continue
        if line.split()[0] in ("/image", "/audio", "/video"):
            pending.append(line.split(maxsplit=1)[1])
            print(f"(attached {pending[-1]})")
            continue
        attached, pending = pending, []  # a failed message drops its attachments with it
        try:
            res = session.ask(line, attached)
            print(_describe(len(session.turns) - 1, line, res))
        except (GenerationInputError, ValueError, OSError) as e:  # the chat stays up
            print(f"error: {e}" + (" (attachments dropped; attach again)" if attached else ""))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", required=True, help="a stage bundle folder (bundles/stage3)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt; repeat for several single turns")
    p.add_argument("--image", action="append", default=[], help="an input image (repeatable)")
    p.add_argument("--audio", action="append", default=[], help="an input audio file (repeatable)")
    p.add_argument("--video", action="append", default=[], help="an input video (repeatable)")
    p.add_argument("--media", nargs="*", default=[], help="input media of any kind (by suffix)")
    p.add_argument("--interactive", action="store_true", help="a multi-turn chat on the terminal")
    p.add_argument("--out", default="outputs/generate", help="where generated files go")
    p.add_argument("--max-new-tokens", type=int, help="default: the bundle's model.generation, else 64")
    p.add_argument(
        "--temperature", type=float, help="0 = greedy; default: the bundle's model.generation, else 0"
    )
    p.add_argument("--top-p", type=float, help="default: the bundle's model.generation, else 1.0")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--weights", help="where the real backbone weights are now, if they moved since training")
    p.add_argument("--backbones", help="where the tiny backbones are now, if they moved since training")
    args = p.parse_args(argv)
    args.media = [*args.media, *args.image, *args.audio, *args.video]
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not args.prompt and not args.interactive:
        p.error("give --prompt TEXT (repeatable) or --interactive")
    try:
        gen = Generator(args.bundle, args.device, weights=args.weights, backbones=args.backbones)
    except (BundleError, FileNotFoundError) as e:
        p.error(f"--bundle {args.bundle}: {e}")
    for key, value in gen.decoding_defaults().items():  # what the command line leaves open
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.interactive:
        return _interactive(gen, args)
    report = []
    for i, prompt in enumerate(args.prompt):
        try:
            res = gen.chat(
                prompt,
                args.media,
                max_new_tokens=args.max_new_tokens,
                temperature=args.temperature,
                top_p=args.top_p,
                seed=args.seed,
                out_dir=Path(args.out) / f"turn{i}",
            )
        except (GenerationInputError, ValueError) as e:
            print(f"error: {e}")
            return 2
        print(_describe(i, prompt, res))
        report.append(
            {
                "prompt": prompt,
                "answer": res.text,
                "files": {k: [str(f) for f in v] for k, v in res.files.items()},
                "signal_groups": res.signal_groups,
                "notes": res.notes,
                "seconds": res.seconds,
            }
        )
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "generations.json").write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
