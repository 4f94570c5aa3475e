"""Run identity: which checkpoints belong to a run, when to resume, where a sweep job's bundles go.

A run is identified by its resolved training config (``run_identity``: everything that decides
what is trained and how, not where files go or how progress is shown). Its checkpoints live in
``${paths.checkpoints}/<key>/`` with a ``run.json`` that records the identity and whether the run
finished. So the same command resumes the same run after a kill, a changed command (another lr,
another ``trainer.max_steps``) is a new run, and a finished run is never resumed by accident.

Jobs of a Hydra sweep (``-m``) write their bundles under ``${paths.bundles}/<tag>/`` where the tag
names the job's swept values other than ``stage`` (``stage.optim.lr=0.0001``): the jobs of one
sweep never share a bundle, and ``-m stage=1,2,3 stage.optim.lr=1e-4,4e-4`` chains within each lr.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict, cast

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from datamodules.records import SourceIdentity
from nextgpt.atomic import Busy, holding
from nextgpt.safeload import UnsafeFileError, check_checkpoint_folder, load_checkpoint

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
# top-level keys that say where files go or how progress is shown, not what is trained
NOT_IDENTITY = ("paths", "logger", "callbacks", "print_config", "resume", "job_name", "hydra", "run", "plan")
TRAINER_NOT_IDENTITY = (
    "default_root_dir",
    "log_every_n_steps",
    "enable_progress_bar",
    "enable_model_summary",
    "num_sanity_val_steps",
    "val_check_interval",
    "check_val_every_n_epoch",
)


class InitFrom(TypedDict):
    """The bundle a run starts from, as its identity records it (its ``meta.json``'s run and step)."""

    path: str
    run: str | None
    global_step: int | None
    written: str | None


class RunIdentity(TypedDict, total=False):
    """What identifies a run (:func:`run_identity`, recorded in its ``run.json``): the sections of its
    resolved config that decide what is trained (all but :data:`NOT_IDENTITY`; the usual ones are
    listed), its ``trainer`` settings but :data:`TRAINER_NOT_IDENTITY`, the bundle it starts from
    (``init_from``: the config's path or ``null`` as given, :class:`InitFrom` once resolved) and the
    identities of the data sources it reads from a data root (``data_files``, by source name)."""

    model: dict[str, Any]
    dataset: dict[str, Any]
    stage: dict[str, Any]
    trainer: dict[str, Any]
    seed: int
    sharding: dict[str, Any] | None
    init_from: InitFrom | str | None
    data_files: dict[str, SourceIdentity]


class RunError(RuntimeError):
    """A run that must not start (or did not train): the message says why and what to do.
    ``train.py`` prints it and exits 2, without a traceback."""


class DataError(RunError, ValueError):
    """Input data that can not be read as it is (the message names the file)."""


def run_identity(
    cfg: DictConfig, init_from: str | None = None, data: Mapping[str, SourceIdentity] | None = None
) -> RunIdentity:
    """The resolved config that decides what a run trains, plus the identity of the bundle it
    starts from (a rewritten earlier stage makes this a new run) and ``data``, signatures of the
    data set's index files (an edited data set makes a new run too)."""
    full = cast(dict[str, Any], OmegaConf.to_container(cfg, resolve=True))  # a DictConfig's is a dict
    ident = cast(RunIdentity, {k: v for k, v in full.items() if k not in NOT_IDENTITY})
    if data:
        ident["data_files"] = dict(data)
    ident["trainer"] = {k: v for k, v in ident.get("trainer", {}).items() if k not in TRAINER_NOT_IDENTITY}
    if init_from:
        meta = Path(init_from) / "meta.json"
        start = json.loads(meta.read_text()) if meta.is_file() else {}
        ident["init_from"] = {
            "path": str(init_from),
            "run": start.get("run"),
            "global_step": start.get("global_step"),
            "written": start.get("written"),
        }
    return ident


def run_key(identity: RunIdentity) -> str:
    return hashlib.sha1(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:12]


def differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """``key: old -> new`` for every leaf that differs."""
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            key = f"{prefix}.{k}" if prefix else str(k)
            if k not in old:
                out.append(f"{key}: (absent) -> {new[k]!r}")
            elif k not in new:
                out.append(f"{key}: {old[k]!r} -> (absent)")
            else:
                out += differences(old[k], new[k], key)
        return out
    return [] if old == new else [f"{prefix}: {old!r} -> {new!r}"]


# --- sweeps -----------------------------------------------------------------------------------
def sweep_tag() -> str:
    """In a multirun job, ``key=value`` of every swept key but ``stage`` (comma-joined, sorted);
    otherwise ``""``. The swept keys are those of the sweep's command line (its ``multirun.yaml``,
    so it holds under any launcher) and of the sweeper's ``params`` (what an Optuna search varies)."""
    if not HydraConfig.initialized():
        return ""
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return ""
    parser = OverridesParser.create()
    sweep_file = Path(hc.sweep.dir) / "multirun.yaml"
    given = list(OmegaConf.load(sweep_file).hydra.overrides.task) if sweep_file.is_file() else []
    swept = {o.get_key_element() for o in parser.parse_overrides(given) if o.is_sweep_override()}
    swept |= set(
        OmegaConf.select(cast(DictConfig, hc), "sweeper.params") or {}  # HydraConf is a DictConfig
    )  # a sweeper's own search space (Optuna, hparams_search/)
    job = {
        o.get_key_element(): o.get_value_element_as_str()
        for o in parser.parse_overrides(list(hc.overrides.task))
    }
    parts = [f"{k}={job[k]}" for k in sorted(swept) if k in job and k.lstrip("+~") != "stage"]
    return ",".join(parts).replace("/", "_")


# --- a run's folder ---------------------------------------------------------------------------
@dataclass
class RunDir:
    path: Path

    @property
    def record(self) -> dict[str, Any]:
        f = self.path / RUN_FILE
        if not f.is_file():
            return {}
        try:
            return json.loads(f.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise RunError(f"{f} is damaged ({e}); delete that run folder to start the run afresh") from e

    def write(self, **fields: Any) -> None:
        rec = {**self.record, **fields, "updated": time.strftime("%Y-%m-%dT%H:%M:%S")}
        self.path.mkdir(parents=True, exist_ok=True)
        tmp = self.path / f".{RUN_FILE}.tmp"
        tmp.write_text(json.dumps(rec, indent=2, default=str), encoding="utf-8")
        tmp.replace(self.path / RUN_FILE)

    def checkpoints(self) -> list[Path]:
        """This run's checkpoints, newest first: ``last.ckpt``, then the step checkpoints by step."""
        if not self.path.is_dir():
            return []
        last = [self.path / "last.ckpt"] if (self.path / "last.ckpt").exists() else []
        steps = sorted(
            (p for p in self.path.glob("*.ckpt") if p.name != "last.ckpt"), key=_step_of, reverse=True
        )
        return last + steps


def hold_run(run: RunDir, held: contextlib.ExitStack) -> None:
    """Take the run's lock (``<run folder>.lock``) for as long as ``held`` lasts; a run that another
    process is training is refused, naming that process. A killed run's lock is free at once."""
    lock = run.path.with_name(f"{run.path.name}.lock")
    try:
        held.enter_context(holding(lock, wait=False))
    except Busy as e:
        raise RunError(
            f"run {run.path} is being trained by {e.holder} (lock {lock}); the same run is never "
            "trained twice at once: wait for it to end (the same command then resumes or refuses it)"
        ) from None


def _step_of(path: Path) -> int:
    digits = "".join(c if c.isdigit() else " " for c in path.stem).split()
    return int(digits[-1]) if digits else -1


def readable_checkpoint(path: Path) -> str | None:
    """Why ``path`` can not be resumed from (``None`` when it can): a truncated or foreign file.
    Raises ``UnsafeFileError`` for a file that asks for more than tensors and plain data: nothing
    in it runs (``nextgpt.safeload``), and it is never passed on to Lightning or DeepSpeed."""
    try:
        if path.is_dir():  # a distributed (sharded) checkpoint
            if not (path / ".metadata").is_file():
                return "its .metadata file is missing"
            check_checkpoint_folder(path)
        else:
            ckpt = load_checkpoint(path, mmap=True)
            if not isinstance(ckpt, dict) or "global_step" not in ckpt:
                return "it is not a Lightning checkpoint"
    except UnsafeFileError:
        raise
    except Exception as e:  # torch raises several types for a damaged file
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'unreadable'}"
    return None


def checkpoint_step(path: str | Path) -> int:
    """The global step a checkpoint (file or sharded folder) was saved at."""
    path = Path(path)
    ckpt = load_checkpoint(path / "meta.pt" if path.is_dir() else path, mmap=not path.is_dir())
    return int(ckpt.get("global_step", 0))


def choose_start(run: RunDir, identity: RunIdentity, resume: Any, *, mutate: bool = True) -> str | None:
    """The checkpoint this run continues from, or ``None`` to start afresh; raises ``RunError`` for
    a finished run (it would train nothing). ``resume``: true (the default: an interrupted run of
    this exact config resumes), false (start afresh; an earlier attempt's folder is kept aside), or
    a run folder / checkpoint to continue from on purpose (e.g. to more steps). ``mutate``: this
    process may move files (global rank 0); the others only decide, and decide the same."""
    if isinstance(resume, str) and resume not in ("true", "false"):
        return _explicit_start(Path(resume), identity)
    rec = run.record
    if resume in (False, "false"):
        if run.path.exists() and mutate:
            aside = _aside(run.path)
            log.info("resume=false: the earlier attempt of this run is kept in %s; starting afresh", aside)
        return None
    if rec.get("status") == "finished":
        raise RunError(
            f"this run already finished: {run.path} trained {rec.get('global_step')} steps on {rec.get('updated')} and "
            f"wrote {rec.get('bundle')}; there is nothing left to train. To train it again from scratch set "
            f"resume=false (the bundle is kept as a version); to continue it further raise trainer.max_steps and set "
            f"resume={run.path}"
        )
    for ckpt in run.checkpoints():
        why = readable_checkpoint(ckpt)
        if why is None:
            return str(ckpt)
        log.warning("checkpoint %s can not be resumed from (%s): trying an older one", ckpt, why)
        if mutate:
            ckpt.rename(ckpt.with_name(f"{ckpt.name}.damaged"))
    if rec:
        log.info(
            "run %s has no usable checkpoint (it stopped before the first one): starting afresh", run.path
        )
    return None


def _explicit_start(path: Path, identity: RunIdentity) -> str:
    run = RunDir(path if path.is_dir() and not (path / ".metadata").is_file() else path.parent)
    candidates = [path] if path.suffix == ".ckpt" else run.checkpoints()
    candidates += [
        p for p in sorted(run.path.glob("finished-*.ckpt"), key=_step_of, reverse=True) if p not in candidates
    ]
    for ckpt in candidates:
        why = readable_checkpoint(ckpt)
        if why is None:
            old = run.record.get("identity")
            changed = differences(old, identity) if old else []
            log.info(
                "resume=%s: continuing from %s%s",
                path,
                ckpt,
                ("; the config differs in: " + "; ".join(changed[:12])) if changed else "",
            )
            return str(ckpt)
        log.warning("checkpoint %s can not be resumed from (%s)", ckpt, why)
    raise RunError(
        f"resume={path}: no readable checkpoint there (looked for last.ckpt, step*.ckpt, finished-*.ckpt)"
    )


def _aside(path: Path) -> Path:
    n = 1
    while path.with_name(f"{path.name}.old{n}").exists():
        n += 1
    target = path.with_name(f"{path.name}.old{n}")
    shutil.move(str(path), str(target))
    return target


def report_other_runs(base: Path, key: str, identity: RunIdentity) -> None:
    """Say why an existing run of the same model, data and stage is not resumed."""
    others = [RunDir(p) for p in sorted(base.glob("*/")) if p.name != key and (p / RUN_FILE).is_file()]
    if not others:
        return
    latest = max(others, key=lambda r: r.record.get("updated", ""))
    rec = latest.record
    changed = differences(rec.get("identity", {}), identity)
    log.info(
        "not resuming %s (%s, step %s): this config differs in %s; starting run %s afresh",
        latest.path,
        rec.get("status"),
        rec.get("global_step"),
        "; ".join(changed[:8]) + (" ..." if len(changed) > 8 else ""),
        key,
    )
