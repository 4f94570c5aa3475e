"""Any-to-any generation from a stage bundle (minimal): prompt (+ media) -> text + media files.

Greedy or sampled decoding with the KV cache on. When the model emits a signal token of a
modality, the rest of that modality's group is forced (a group that starts mid-way is repaired
the same way and reported); the group's hidden states go through the output projector into the
decoder pipeline via ``prompt_embeds``, with the empty prompt's embedding as negative.

    python -m nextgpt.generate --bundle bundles/stage3 --prompt "Show me an image of a red circle" --out outputs/gen
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from nextgpt import modality as modality_registry
from nextgpt.bundles import load_bundle_config, load_bundle_weights
from nextgpt.decoders import load_pipeline
from nextgpt.model import build_nextgpt, torch_dtype
from nextgpt.prompts import Conversation, encode_conversation, get_template

log = logging.getLogger(__name__)


def _cache_field() -> str:
    """transformers 5 renamed ``past_key_values`` to ``cache`` (argument and output field)."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


CACHE = _cache_field()


@dataclass
class GenerationResult:
    text: str
    files: dict[str, list[Path]] = field(default_factory=dict)
    arrays: dict[str, list[np.ndarray]] = field(default_factory=dict)
    repaired_groups: int = 0
    new_tokens: int = 0
    seconds: float = 0.0


def modality_of_file(path: str | Path) -> str:
    suffix = Path(path).suffix.lower()
    for name in modality_registry.names():
        if suffix in modality_registry.get(name).extensions:
            return name
    raise ValueError(f"{path}: can not tell the modality from the suffix {suffix!r}")


class Generator:
    """A loaded stage bundle plus its decoder pipelines (loaded once, on first use)."""

    def __init__(self, bundle: str | Path, device: str = "cpu"):
        from nextgpt.stages import STAGES

        self.bundle = Path(bundle)
        cfg = load_bundle_config(self.bundle)
        self.model_cfg = cfg.model
        model, self.tokenizer, self.conditioners = build_nextgpt(cfg.model)
        if STAGES[int(cfg.stage.number)].use_lora:
            model.apply_lora(**{k: cfg.model.lora[k] for k in ("r", "alpha", "dropout", "target_modules")})
        load_bundle_weights(self.bundle, model)
        self.model = model.to(device).eval()
        self.device = torch.device(device)
        self.template = get_template(cfg.model.llm.template)
        self.num_media_tokens = int(cfg.model.input_projector.num_tokens)
        self.pipelines: dict = {}

    def pipeline(self, name: str):
        if name not in self.pipelines:
            dec = self.model_cfg.modalities[name].decoder
            self.pipelines[name] = load_pipeline(dec.path, torch_dtype(dec.dtype), self.device)
        return self.pipelines[name]

    def _step(self, embeds: torch.Tensor, past):
        out = self.model.llm(inputs_embeds=embeds, use_cache=True, output_hidden_states=True, **{CACHE: past})
        hidden = out.hidden_states[-1]
        logits = self.model.new_tokens.logits(hidden[:, -1:], out.logits[:, -1:])[0, -1]
        return logits, hidden[0], getattr(out, CACHE)

    @torch.no_grad()
    def chat(
        self,
        prompt: str,
        media: Sequence[str | Path] = (),
        history: Sequence[tuple[str, str]] = (),
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        seed: int = 0,
        out_dir: str | Path | None = None,
    ) -> GenerationResult:
        start = time.perf_counter()
        media_in = [(modality_of_file(p), str(p)) for p in media]
        layout = self.model.layout
        conv = Conversation("prompt", [*history, (prompt, "")], media_in=media_in)
        enc = encode_conversation(conv, self.tokenizer, layout, self.template, num_media_tokens=self.num_media_tokens,
                                  max_length=10**9, slot_id=self.tokenizer.pad_token_id)
        ids = torch.tensor([enc.input_ids], device=self.device)
        mask = torch.zeros_like(ids, dtype=torch.bool)
        tensors: dict[str, list[torch.Tensor]] = {}
        sequence = []
        for s, name, i in enc.media_slots:
            mask[0, s : s + self.num_media_tokens] = True
            sequence.append((name, len(tensors.setdefault(name, []))))
            tensors[name].append(modality_registry.get(name).load(media_in[i][1]))
        stacked = {k: torch.stack(v).to(self.device) for k, v in tensors.items()}
        logits, _, past = self._step(self.model.embed_inputs(ids, mask, stacked, sequence), None)

        gen = torch.Generator(device="cpu").manual_seed(seed)
        text_ids: list[int] = []
        pieces: list[str] = []
        groups: list[tuple[str, torch.Tensor, list[int]]] = []
        repaired, produced = 0, 0
        while produced < max_new_tokens:
            if temperature > 0:
                probs = torch.softmax(logits.float().cpu() / temperature, -1)
                next_id = int(torch.multinomial(probs, 1, generator=gen))
            else:
                next_id = int(logits.argmax())
            if next_id == self.tokenizer.eos_token_id:
                break
            name = layout.signal_modality(next_id)
            feed = list(layout.signal_ids[name]) if name else [next_id]
            if name and next_id != feed[0]:
                repaired += 1  # a group that did not start at its first token: force the whole group
            logits, hidden, past = self._step(self.model.embed_tokens(torch.tensor([feed], device=self.device)), past)
            produced += len(feed)
            if name:
                pieces.append(self.tokenizer.decode(text_ids, skip_special_tokens=True))
                pieces.append(f" {modality_registry.get(name).placeholder} ")
                text_ids = []
                groups.append((name, hidden[-len(feed):], feed))
            else:
                text_ids.append(next_id)
                if self.tokenizer.decode(text_ids).rstrip().endswith(self.template.stop):
                    break
        pieces.append(self.tokenizer.decode(text_ids, skip_special_tokens=True))
        text = " ".join("".join(pieces).split())
        if text.endswith(self.template.stop):
            text = text[: -len(self.template.stop)].rstrip()

        result = GenerationResult(text, repaired_groups=repaired, new_tokens=produced)
        for k, (name, hidden, feed) in enumerate(groups):
            array = self._decode(name, hidden, feed, seed + k)
            result.arrays.setdefault(name, []).append(array)
            if out_dir is not None:
                mod = modality_registry.get(name)
                out = Path(out_dir)
                out.mkdir(parents=True, exist_ok=True)
                meta = {"prompt": prompt, "answer": text, "seed": seed + k, "bundle": str(self.bundle),
                        **dict(self.model_cfg.modalities[name].decoder.get("save", {}))}
                path = out / f"{name}_{k}{mod.output_suffix}"
                result.files.setdefault(name, []).append(mod.write(array, path, self.pipeline(name), meta))
        result.seconds = time.perf_counter() - start
        return result

    def _decode(self, name: str, hidden: torch.Tensor, feed: list[int], seed: int) -> np.ndarray:
        ids = torch.tensor(feed, device=self.device)
        states = hidden + self.model.embed_tokens(ids).to(hidden.dtype)
        cond = self.model.output_projectors[name](states.unsqueeze(0))
        conditioner = self.conditioners[name]
        pipe = self.pipeline(name)
        dtype = pipe.dtype
        negative = conditioner.to(self.device).encode([""])
        out = pipe(
            prompt_embeds=conditioner.to_pipeline(cond).to(dtype),
            negative_prompt_embeds=conditioner.to_pipeline(negative).to(dtype),
            generator=torch.Generator(device="cpu").manual_seed(seed),
            output_type="np",
            **dict(self.model_cfg.modalities[name].decoder.generate),
        )
        return np.asarray(getattr(out, modality_registry.get(name).pipeline_output)[0])


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", required=True, help="a stage bundle folder (bundles/stage3)")
    p.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for several single turns")
    p.add_argument("--media", nargs="*", default=[], help="input image / audio / video files")
    p.add_argument("--out", default="outputs/generate", help="where generated files go")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not Path(args.bundle).is_dir():
        p.error(f"--bundle {args.bundle}: no such folder (train a stage first: python train.py stage=1)")
    gen = Generator(args.bundle, args.device)
    report = []
    for i, prompt in enumerate(args.prompt):
        res = gen.chat(prompt, args.media, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                       seed=args.seed, out_dir=Path(args.out) / f"turn{i}")
        files = {k: [str(f) for f in v] for k, v in res.files.items()}
        print(f"[{i}] {prompt!r}\n    -> {res.text!r}\n    files: {files or 'none'} ({res.seconds:.1f} s, "
              f"{res.new_tokens} tokens, {res.repaired_groups} repaired groups)")
        report.append({"prompt": prompt, "answer": res.text, "files": files, "seconds": res.seconds})
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "generations.json").write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
