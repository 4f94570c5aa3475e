"""What ``evaluate.py`` does once Hydra has composed the config.

``task=heldout_loss``: caption cross-entropy and, for text-to-X, the alignment loss against each
decoder's own text encoder on a training-layout data set (needs no extra weights); the benchmark
tasks of the paper: :mod:`nextgpt.evaluation`.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from typing import Any

import hydra
import torch
from omegaconf import DictConfig
from tqdm import tqdm

from datamodules.json_datamodule import NextGPTDataModule
from nextgpt.bundles import load_bundle_config
from nextgpt.evaluation.spec import EvalSpec, HeldoutSpec, eval_spec
from nextgpt.evaluation.tasks import run_benchmark, stage_bundle
from nextgpt.model_spec import ModelSpec
from nextgpt.spec import LossSpec, OptimSpec
from nextgpt.stages import STAGES

log = logging.getLogger(__name__)


def evaluate(cfg: DictConfig) -> Mapping[str, Any]:
    """Run the task ``cfg`` names: resolved once into its :class:`EvalSpec`, which is all that
    the evaluation reads."""
    spec = eval_spec(cfg)
    if spec.heldout is not None:
        return heldout_loss(spec, spec.heldout)
    return run_benchmark(spec)


def heldout_datamodule(
    data: HeldoutSpec, objective: str, model: ModelSpec, template: str, batch_size: int
) -> NextGPTDataModule:
    """The dataset's own ``datamodule`` node (:class:`HeldoutSpec`: a shard dataset's is read from
    the NExT-GPT layout) with the bundle's prompt template."""
    factory = hydra.utils.instantiate(
        dict(data.datamodule),
        objective=objective,
        template=template,
        batch_size=batch_size,
        seed=0,
        _convert_="all",
        _partial_=True,
    )
    return factory(model=model)  # an object: handed to the partial, never merged into a config


def heldout_loss(spec: EvalSpec, data: HeldoutSpec) -> dict[str, Any]:
    bundle = stage_bundle(spec.checkpoint)
    run = load_bundle_config(bundle)
    stage_cls = STAGES[int(run.stage.number)]
    objective = data.objective or run.stage.objective
    model = ModelSpec.from_config(run.model)  # the bundle's own model
    module = stage_cls(
        model=model,
        optim=OptimSpec.of(run.stage.optim),
        loss=LossSpec.of(run.stage.loss),
        init_from=str(bundle),
    )
    module.aligns = (
        objective != "caption"
    )  # a stage-1 bundle asked about text-to-X is scored on alignment too
    module.configure_model()
    module.to(spec.device).eval()
    dm = heldout_datamodule(data, objective, model, model.llm.template, spec.batch_size)
    dm.prepare_data()
    dm.setup("validate")
    held_out = dm.train_set
    assert held_out is not None  # setup builds it (or raises: no usable sample)
    if spec.limit is not None:
        held_out.conversations = held_out.conversations[: spec.limit]
    sums: dict[str, float] = {}
    n_batches = n_samples = skipped = 0
    with torch.no_grad():
        for batch in tqdm(dm._loader(held_out, shuffle=False), desc=f"evaluate {bundle.name}"):
            if not batch["keys"]:  # every sample of the batch was unreadable
                skipped += int(batch["num_skipped"])
                continue
            batch = module.transfer_batch_to_device(batch, module.device, 0)
            for k, v in module.compute_loss(batch).items():
                sums[k] = sums.get(k, 0.0) + float(v)
            n_batches += 1
            n_samples += batch["input_ids"].shape[0]
            skipped += int(batch["num_skipped"])
    result: dict[str, Any] = {
        "checkpoint": str(bundle),
        "stage": int(run.stage.number),
        "task": spec.name,
        "objective": objective,
        "dataset": data.dataset,
        "samples": n_samples,
        "skipped": skipped,
        **{f"{k}": v / max(n_batches, 1) for k, v in sums.items()},
    }
    if "ce" in result:
        result["perplexity"] = math.exp(min(result["ce"], 50.0))
    out = spec.output_dir / "eval.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    log.info("evaluation: %s (written to %s)", result, out)
    return result
