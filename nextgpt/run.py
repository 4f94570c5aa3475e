"""What train.py does once Hydra has composed the config: validate, prepare, instantiate, fit."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from lightning.pytorch.utilities import rank_zero_info
from omegaconf import DictConfig, OmegaConf

from nextgpt.config import import_object, previous_bundle, resolve_batch, validate, validate_paths

log = logging.getLogger(__name__)


def prepare_backbones(cfg: DictConfig) -> None:
    """Build the tiny random backbones once, when the model config asks for them."""
    if cfg.model.get("build_tiny"):
        from nextgpt.tiny import build_all

        build_all(Path(cfg.paths.backbones))


def denoise_targets(cfg: DictConfig) -> dict:
    """modality -> decoder generation settings, for the modalities whose denoising loss is on."""
    if float(cfg.stage.loss.get("denoise", 0.0)) <= 0:
        return {}
    return {name: OmegaConf.to_container(m.decoder.generate, resolve=True)
            for name, m in cfg.model.modalities.items() if m.decoder.get("denoise")}


def build_datamodule(cfg: DictConfig):
    from datamodules.datamodule import NextGPTDataModule

    d = cfg.dataset
    if d.get("loader", "json") == "shards":
        from datamodules.shard_datamodule import ShardDataModule

        return ShardDataModule(
            sources=OmegaConf.to_container(d.sources), task=cfg.stage.task, model=OmegaConf.to_container(cfg.model),
            template=d.template, batch_size=d.batch_size, num_workers=d.num_workers, max_length=d.max_length,
            seed=cfg.seed, shards_root=cfg.paths.shards, shuffle=bool(d.get("shuffle", True)),
            shard_size=int(d.get("shard_size", 1000)), max_skip_fraction=float(d.get("max_skip_fraction", 0.1)),
            cache_fallback=str(Path(cfg.paths.cache_dir) / "features"),
        )
    return NextGPTDataModule(
        sources=OmegaConf.to_container(d.sources), task=cfg.stage.task, model=OmegaConf.to_container(cfg.model),
        template=d.template, batch_size=d.batch_size, num_workers=d.num_workers, max_length=d.max_length,
        val_fraction=d.val_fraction, seed=cfg.seed,
        synthetic=OmegaConf.to_container(d.synthetic) if d.get("synthetic") else None,
        feature_cache=bool(d.get("feature_cache", True)), cache_fallback=str(Path(cfg.paths.cache_dir) / "features"),
        denoise_targets=denoise_targets(cfg),
    )


def build_module(cfg: DictConfig, init_from: str | None):
    cls = import_object(cfg.stage.module)
    return cls(
        model=OmegaConf.to_container(cfg.model), optim=OmegaConf.to_container(cfg.stage.optim),
        loss=OmegaConf.to_container(cfg.stage.loss), init_from=init_from,
        sharding=OmegaConf.to_container(cfg.sharding) if cfg.get("sharding") else None,
        run_config=OmegaConf.to_container(cfg),
    )


def instantiate_all(node: Any) -> list:
    return [hydra.utils.instantiate(v) for v in (node or {}).values() if v is not None and "_target_" in v]


def build_trainer(cfg: DictConfig) -> L.Trainer:
    return hydra.utils.instantiate(cfg.trainer, callbacks=instantiate_all(cfg.get("callbacks")),
                                   logger=instantiate_all(cfg.get("logger")) or False)


def _single_log_stream() -> None:
    """Lightning adds its own console handlers; Hydra's root handlers (console + run log file)
    already print everything, so drop Lightning's to avoid every line appearing twice."""
    if logging.getLogger().handlers:
        for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
            logger = logging.getLogger(name)
            logger.handlers.clear()
            logger.propagate = True


def _finish_wandb() -> None:
    """Close the W&B run: Lightning leaves it open, and the next job of a multirun
    (`-m stage=1,2,3`) would otherwise log into the previous stage's run."""
    import sys

    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish()


def train(cfg: DictConfig) -> dict[str, float]:
    _single_log_stream()
    validate(cfg)  # types and ranges: before anything is built or loaded
    OmegaConf.resolve(cfg)
    plan = resolve_batch(cfg)  # sets trainer.accumulate_grad_batches from stage.global_batch_size
    if "DeepSpeedStrategy" in str(OmegaConf.select(cfg, "trainer.strategy._target_", default="")):
        from nextgpt.strategies import deepspeed_preflight

        deepspeed_preflight(cfg, plan)  # DeepSpeed's own config checks, before any weight loads
    prepare_backbones(cfg)
    validate_paths(cfg)
    if cfg.get("print_config"):
        log.info("config:\n%s", OmegaConf.to_yaml(cfg))
    rank_zero_info(f"stage {cfg.stage.number} batch: {plan}")
    L.seed_everything(cfg.seed, workers=True)
    init_from = previous_bundle(cfg)
    datamodule = build_datamodule(cfg)
    module = build_module(cfg, init_from)
    trainer = build_trainer(cfg)
    last = Path(cfg.paths.checkpoints) / "last.ckpt"
    ckpt_path = str(last) if cfg.get("resume") and last.exists() else None  # a file, or a sharded checkpoint folder
    if ckpt_path:
        log.info("resuming stage %s from %s", cfg.stage.number, ckpt_path)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    finally:
        _finish_wandb()
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    log.info("stage %s finished at step %d: %s", cfg.stage.number, trainer.global_step, metrics)
    return metrics
