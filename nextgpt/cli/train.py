"""What train.py does once Hydra has composed the config: validate, prepare, instantiate, fit."""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import Any

import hydra
import lightning as L
from lightning.pytorch.utilities import rank_zero_info
from omegaconf import DictConfig, OmegaConf

from callbacks.memory_plan import MemoryPlan, PlanRefused
from datamodules.base import SourceDataModule
from datamodules.source_files import forget
from nextgpt.config import ConfigError, launch_rank
from nextgpt.data_source import SourceIdentity
from nextgpt.decoders import target_spec
from nextgpt.plan import PlanSettings
from nextgpt.preflight import deepspeed_preflight, unwritable_errors, validate_paths
from nextgpt.runs import (
    RunDir,
    RunError,
    RunIdentity,
    checkpoint_step,
    choose_start,
    hold_run,
    report_other_runs,
    run_identity,
    run_key,
    sweep_tag,
)
from nextgpt.schema import validate
from nextgpt.spec import RunSpec, run_spec
from nextgpt.stages import NextGPTStage
from nextgpt.tokens import Tokens, load_tokenizer

log = logging.getLogger(__name__)


def denoise_targets(spec: RunSpec) -> dict[str, dict[str, Any]]:
    """modality -> decoder generation settings, for the modalities whose denoising loss is on."""
    if spec.stage.loss.denoise <= 0:
        return {}
    return {name: target_spec(dec) for name, dec in spec.model.generated.items() if dec.denoise}


def build_datamodule(cfg: DictConfig, spec: RunSpec) -> SourceDataModule:
    """``dataset.datamodule`` (its ``_target_`` and settings), for this stage's objective and model
    (the spec is handed to the partial, never merged into a config). Nothing is read yet: train()
    asks it for its path checks and its data's identity, then shares the model's tokenizer with it."""
    extra = {"denoise_targets": denoise_targets(spec)} if cfg.dataset.get("loader", "json") == "json" else {}
    factory = hydra.utils.instantiate(
        cfg.dataset.datamodule,
        objective=cfg.stage.objective,
        _convert_="all",
        _partial_=True,
        **extra,
    )
    return factory(model=spec.model)


def build_module(cfg: DictConfig, spec: RunSpec, tokens: Tokens) -> NextGPTStage:
    """``stage.module`` (a partial LightningModule) given the model, the stage's optimizer and loss,
    and the bundle it starts from."""
    factory = hydra.utils.instantiate(cfg.stage.module)
    return factory(
        model=spec.model,
        optim=spec.stage.optim,
        loss=spec.stage.loss,
        init_from=None if spec.init_from is None else str(spec.init_from),
        sharding=spec.sharding,
        cache_dir=str(spec.paths.features),
        run_config=OmegaConf.to_container(cfg),
        tokens=tokens,
    )


def instantiate_all(node: Any) -> list:
    return [hydra.utils.instantiate(v) for v in (node or {}).values() if v is not None and "_target_" in v]


def build_trainer(cfg: DictConfig, spec: RunSpec) -> L.Trainer:
    """``trainer`` with the configured callbacks and loggers, and the memory plan (``plan.check``):
    made when the trainer sets up, before the model loads, and refusing a run that would not fit."""
    settings = PlanSettings.of(cfg)
    plan = [MemoryPlan(spec, settings)] if settings.check else []
    return hydra.utils.instantiate(
        cfg.trainer,
        callbacks=[*instantiate_all(cfg.get("callbacks")), *plan],
        logger=instantiate_all(cfg.get("logger")) or False,
    )


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
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish()


def prepare_run(
    cfg: DictConfig, spec: RunSpec, data: dict[str, SourceIdentity], held: contextlib.ExitStack
) -> tuple[RunDir, RunIdentity, str | None]:
    """Give the run its identity (a key over its training config, what it starts from and ``data``,
    the identity of each data source) and its checkpoint folder, and decide where it starts: (run,
    identity, checkpoint or None). The run's folders go into ``cfg.run`` for the callbacks'
    interpolations (``${run.dir}``, ``${run.bundle}``). Only global rank 0 changes files here,
    holding the run's lock (in ``held``) so that the same run started twice at once is refused; the
    other ranks reach the same decision."""
    init_from = None if spec.init_from is None else str(spec.init_from)
    identity = run_identity(cfg, init_from, data=data)
    key = run_key(identity)
    run = RunDir(spec.paths.checkpoints / key)
    cfg.run.key, cfg.run.dir, cfg.run.bundle = key, str(run.path), str(spec.bundle)
    rank_zero = launch_rank() == 0
    if rank_zero:
        hold_run(run, held)
    start = choose_start(run, identity, spec.resume, mutate=rank_zero)
    if start is None and rank_zero:
        report_other_runs(run.path.parent, key, identity)
    return run, identity, start


def train(cfg: DictConfig) -> dict[str, float]:
    _single_log_stream()
    forget()  # media listings are taken afresh once per run (a sweep runs several in one process)
    validate(cfg)  # types and ranges: before anything is built or loaded
    spec = run_spec(cfg, tag=sweep_tag())  # everything derived from the config, once
    cfg.run.tag = spec.tag  # for the loggers' run names
    cfg.trainer.accumulate_grad_batches = spec.batch.accumulate  # from stage.global_batch_size
    if "DeepSpeedStrategy" in str(OmegaConf.select(cfg, "trainer.strategy._target_", default="")):
        # DeepSpeed's own config checks, before any weight loads
        deepspeed_preflight(hydra.utils.instantiate(cfg.trainer.strategy), str(cfg.trainer.precision), spec)
    hydra.utils.instantiate(cfg.model.get("backbones"))  # model.backbones: tiny/world models build theirs
    datamodule = build_datamodule(cfg, spec)  # its sources, parsed once: path checks and identities
    validate_paths(spec, cfg.get("init_from"), datamodule.path_errors())
    # the first folders this run creates: found now, not after training
    if errors := unwritable_errors(spec.paths):
        raise ConfigError(errors)
    with contextlib.ExitStack() as held:
        # may refuse (a finished or running run): before anything loads
        run, identity, ckpt_path = prepare_run(cfg, spec, datamodule.identity(), held)
        return fit(cfg, spec, datamodule, run, identity, ckpt_path)


def fit(
    cfg: DictConfig,
    spec: RunSpec,
    datamodule: SourceDataModule,
    run: RunDir,
    identity: RunIdentity,
    ckpt_path: str | None,
) -> dict[str, float]:
    """Build the stage and the trainer, train on ``datamodule``, and mark the run finished."""
    OmegaConf.resolve(cfg)
    if cfg.get("print_config"):
        log.info("config:\n%s", OmegaConf.to_yaml(cfg))
    number = spec.stage.number
    rank_zero_info(f"stage {number} batch: {spec.batch}")
    rank_zero_info(f"stage {number} run {run.path.name}: checkpoints in {run.path}, bundle {spec.bundle}")
    L.seed_everything(spec.seed, workers=True)
    tokens = load_tokenizer(spec.model)  # once: data and model
    datamodule.share_tokens(tokens)
    module = build_module(cfg, spec, tokens)
    trainer = build_trainer(cfg, spec)
    if trainer.is_global_zero:
        run.write(
            key=run.path.name,
            status="running",
            stage=number,
            identity=identity,
            resumed_from=ckpt_path,
            bundle=None,
        )
    if ckpt_path:
        module.start_step = checkpoint_step(ckpt_path)  # what this run trains is counted from here
        log.info("resuming stage %s from %s (step %d)", number, ckpt_path, module.start_step)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except PlanRefused:  # before the model loaded: the run folder says so (no checkpoint to resume)
        if trainer.is_global_zero:
            run.write(status="refused", global_step=module.start_step)
        raise
    finally:
        _finish_wandb()
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if trainer.interrupted:
        raise RunError(
            f"stage {number} was interrupted at step {trainer.global_step}; rerun the same "
            f"command to resume it from {run.path}"
        )
    trained = trainer.global_step - module.start_step
    if trained <= 0:
        callbacks = trainer.callbacks  # type: ignore[attr-defined]  # Lightning sets it at init, undeclared
        report = next((c.summary() for c in callbacks if hasattr(c, "summary")), "no data report")
        raise RunError(
            f"stage {number} trained 0 steps (dataset {cfg.dataset.name!r}: {report}; "
            f"trainer.max_steps={cfg.trainer.max_steps}, trainer.max_epochs={cfg.trainer.max_epochs} from step "
            f"{module.start_step}): no bundle was written and {spec.bundle} is unchanged"
        )
    if trainer.is_global_zero:
        finish_run(run, trainer, str(spec.bundle))
    log.info(
        "stage %s finished at step %d (%d trained in this run): %s",
        number,
        trainer.global_step,
        trained,
        metrics,
    )
    return metrics


def finish_run(run: RunDir, trainer: L.Trainer, bundle: str) -> None:
    """Mark the run finished and retire its ``last.ckpt`` (written after the bundle by Lightning's
    own end-of-training save), so that only an interrupted run is ever resumed."""
    last = run.path / "last.ckpt"
    if last.exists():
        last.replace(run.path / f"finished-step{trainer.global_step:06d}.ckpt")
    run.write(status="finished", global_step=trainer.global_step, bundle=bundle)
