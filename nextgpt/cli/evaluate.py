"""What ``evaluate.py`` does once Hydra has composed the config.

``task=heldout_loss``: caption cross-entropy and, for text-to-X, the alignment loss against each
decoder's own text encoder on a training-layout data set (needs no extra weights); the benchmark
tasks of the paper: :mod:`nextgpt.evaluation`.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, cast

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from datamodules.json_datamodule import NextGPTDataModule
from nextgpt.bundles import load_bundle_config
from nextgpt.config import ConfigError
from nextgpt.evaluation.tasks import KINDS, run_benchmark, stage_bundle
from nextgpt.stages import STAGES

log = logging.getLogger(__name__)


def evaluate(cfg: DictConfig) -> dict:
    name = cfg.task.name
    if name == "heldout_loss":
        return heldout_loss(cfg)
    if cfg.task.get("kind") not in KINDS:
        raise ConfigError([f"task.kind={cfg.task.get('kind')!r}: must be one of {list(KINDS)} (task {name})"])
    return run_benchmark(cfg)


def heldout_datamodule(
    d: DictConfig, objective: str, model_cfg: dict, template: str, batch_size: int
) -> NextGPTDataModule:
    """The dataset's own ``datamodule`` node with the bundle's prompt template; a shard dataset's
    samples are read from the NExT-GPT layout they are written from (in their JSON order, so
    ``limit=N`` is the same N samples on every run)."""
    node = d.datamodule
    if d.get("loader", "json") != "json":
        node = {
            "_target_": "datamodules.json_datamodule.NextGPTDataModule",
            "sources": d.sources,
            "max_length": d.max_length,
            "num_workers": d.num_workers,
            "feature_cache": d.feature_cache,
        }
    return hydra.utils.instantiate(
        node,
        objective=objective,
        model=model_cfg,
        template=template,
        batch_size=batch_size,
        seed=0,
        _convert_="all",
    )


def heldout_loss(cfg: DictConfig) -> dict:
    bundle = stage_bundle(cfg)
    run = load_bundle_config(bundle)
    stage_cls = STAGES[int(run.stage.number)]
    objective = cfg.objective or run.stage.objective
    model_cfg = cast(dict[str, Any], OmegaConf.to_container(run.model, resolve=True))  # a mapping section
    module = stage_cls(
        model=model_cfg, optim=dict(run.stage.optim), loss=dict(run.stage.loss), init_from=str(bundle)
    )
    module.aligns = (
        objective != "caption"
    )  # a stage-1 bundle asked about text-to-X is scored on alignment too
    module.configure_model()
    module.to(cfg.device).eval()
    d = cfg.dataset
    dm = heldout_datamodule(d, objective, model_cfg, run.model.llm.template, int(cfg.batch_size))
    dm.prepare_data()
    dm.setup("validate")
    held_out = dm.train_set
    assert held_out is not None  # setup builds it (or raises: no usable sample)
    if cfg.limit is not None:
        held_out.conversations = held_out.conversations[: int(cfg.limit)]
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
    result = {
        "checkpoint": str(bundle),
        "stage": int(run.stage.number),
        "task": cfg.task.name,
        "objective": objective,
        "dataset": d.name,
        "samples": n_samples,
        "skipped": skipped,
        **{f"{k}": v / max(n_batches, 1) for k, v in sums.items()},
    }
    if "ce" in result:
        result["perplexity"] = math.exp(min(result["ce"], 50.0))
    out = Path(cfg.paths.output_dir) / "eval.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    log.info("evaluation: %s (written to %s)", result, out)
    return result
