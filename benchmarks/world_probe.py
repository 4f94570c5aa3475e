"""Does a stage bundle's output projector say *which* caption it was asked for, and does the LLM?

Teacher-forced held-out world requests ("Generate an image: a red circle ..." answered by the signal
tokens): for each request, the nearest (Euclidean) of the decoder's own text embeddings of every
distinct held-out caption, read from

- the output projector's conditioning (what stage 2 trained), and
- a ridge-regression read-out of the frozen LLM's signal-token states, fitted on other world items
  (what the LLM's states hold: the ceiling a projector could reach linearly).

Prints top-1 and colour accuracy beside chance. A projector that learned only the mean target scores
chance whatever its alignment loss.

    .venv/bin/python benchmarks/world_probe.py --bundle bundles/stage2 [override ...]

Overrides are the train.py ones the bundle was trained with (model=world dataset=world ...).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from datamodules.nextgpt_layout import read_source
from nextgpt.batch import Collator, ConversationDataset
from nextgpt.cli.train import build_module
from nextgpt.config import compose
from nextgpt.decoders import TextConditioner
from nextgpt.spec import run_spec
from nextgpt.tokens import load_tokenizer
from nextgpt.world.attributes import caption_attributes
from nextgpt.world.synthetic import dataset_name, write_synthetic


@torch.no_grad()
def states(module, template: str, root: Path, limit: int):
    """(signal-token states, projector conditioning, captions) of the one-shape image requests under root."""
    convs, _ = read_source(
        dataset_name("image"), "image", root / dataset_name("image"), "generate", warn=False
    )
    convs = [c for c in convs if " and a " not in c.captions_out[0][1]][:limit]
    tokens = module.model_spec.input_projector.num_tokens
    ds = ConversationDataset(convs, module.tokenizer, module.model.layout, template, tokens, 512)
    batch = Collator(module.tokenizer.pad_token_id, tokens)([ds[i] for i in range(len(ds))])
    out = module.model(**batch)
    signal = torch.tensor(module.model.layout.signal_ids["image"])
    mask = torch.isin(batch["input_ids"], signal)
    return (
        out.hidden[mask].view(len(convs), -1).float(),
        out.conditioning["image"].float(),
        batch["output_captions"]["image"],
    )


def scores(picked: list[str], asked: list[str]) -> dict[str, float]:
    return {
        "top1": float(np.mean([p == a for p, a in zip(picked, asked, strict=False)])),
        "colour": float(
            np.mean(
                [
                    caption_attributes(p, "image")["colour"] == caption_attributes(a, "image")["colour"]
                    for p, a in zip(picked, asked, strict=False)
                ]
            )
        ),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", required=True)
    p.add_argument("--stage", type=int, default=2)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    cfg = compose(
        [f"stage={args.stage}", f"init_from={args.bundle}", *args.overrides], output_dir=tempfile.mkdtemp()
    )
    OmegaConf.resolve(cfg)
    spec = run_spec(cfg)
    module = build_module(cfg, spec, load_tokenizer(spec.model))  # as train.py builds it
    module.configure_model()
    module.eval()
    dec = cfg.model.modalities.image.decoder
    encoder = TextConditioner(dec.path, dec.conditioning)
    with tempfile.TemporaryDirectory() as tmp:
        fit_root, held_root = Path(tmp) / "fit", Path(tmp) / "held"
        write_synthetic(fit_root, num_per_modality=300, seed=5)
        write_synthetic(held_root, num_per_modality=160, seed=1000)
        x_fit, _, fit_caps = states(module, cfg.dataset.template, fit_root, 300)
        x_held, cond, asked = states(module, cfg.dataset.template, held_root, 100)
    distinct = sorted(set(asked))
    targets = encoder.encode(distinct).float().flatten(1)
    mu, sd = x_fit.mean(0), x_fit.std(0) + 1e-6
    design = torch.cat([(x_fit - mu) / sd, torch.ones(len(x_fit), 1)], 1)
    weights = torch.linalg.solve(
        design.T @ design + 10 * torch.eye(design.shape[1]),
        design.T @ encoder.encode(fit_caps).float().flatten(1),
    )
    readout = torch.cat([(x_held - mu) / sd, torch.ones(len(x_held), 1)], 1) @ weights
    nearest = lambda v: [distinct[int(j)] for j in torch.cdist(v, targets).argmin(1)]  # noqa: E731
    print(
        f"{len(asked)} held-out requests, {len(distinct)} distinct captions: chance top-1 "
        f"{1 / len(distinct):.3f}, colour {1 / 7:.3f}"
    )
    print(f"output projector (the bundle):         {scores(nearest(cond.flatten(1)), asked)}")
    print(f"linear read-out of the LLM's states:   {scores(nearest(readout), asked)}")


if __name__ == "__main__":
    main()
