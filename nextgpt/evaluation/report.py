"""Results of a benchmark task as written and logged: ``results.md`` beside the paper's numbers,
the loggers' metrics and a W&B table of sample outputs."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

from hydra.utils import instantiate

from nextgpt.evaluation.readers import Sample
from nextgpt.evaluation.records import BenchmarkResult, PerSample, Record, media_file
from nextgpt.evaluation.spec import EvalSpec, TaskSpec

log = logging.getLogger(__name__)

# metric -> (shown as, better); anything not listed is shown by its name
METRIC_INFO: dict[str, tuple[str, str]] = {
    "bleu1": ("BLEU-1", "higher"),
    "bleu2": ("BLEU-2", "higher"),
    "bleu3": ("BLEU-3", "higher"),
    "bleu4": ("BLEU-4", "higher"),
    "meteor": ("METEOR", "higher"),
    "rouge_l": ("ROUGE-L", "higher"),
    "cider": ("CIDEr", "higher"),
    "spice": ("SPICE", "higher"),
    "spider": ("SPIDEr", "higher"),
    "fid": ("FID", "lower"),
    "fad": ("FAD", "lower"),
    "clip_score": ("CLIP score", "higher"),
    "clap_score": ("CLAP score", "higher"),
    "clipsim": ("CLIPSIM", "higher"),
    "trigger_rate": ("signal trigger rate", "higher"),
    "align_loss": ("alignment loss (held-out captions)", "lower"),
    "caption_ce": ("caption cross-entropy (held-out)", "lower"),
}


def _fmt(v: float | None) -> str:
    if v is None:
        return "–"
    return f"{v:.4g}" if abs(v) < 1000 else f"{v:.1f}"


def results_markdown(result: BenchmarkResult) -> str:
    """Our numbers beside the paper's (each task config's ``paper:`` entry), on the paper's scale."""
    paper = result.get("paper") or {}
    lines = [
        f"# {result['task']}: {result['kind']} ({result['modality']})",
        "",
        f"- benchmark: `{result['benchmark']}`, {result['samples']} samples"
        + (f" (limit={result['limit']})" if result.get("limit") is not None else "")
        + f", {result['answered']} answered",
        f"- predictions: `{result['predictions']}`"
        if result.get("predictions")
        else f"- checkpoint: `{result['checkpoint']}`",
        "",
        "| metric | ours | NExT-GPT (paper) | best baseline (paper) | notes |",
        "|---|---|---|---|---|",
    ]
    for name, entry in result["metrics"].items():
        shown, better = METRIC_INFO.get(name, (name, ""))
        arrow = {"higher": " ↑", "lower": " ↓"}.get(better, "")
        ref = paper.get(name) or {}
        scale = float(ref.get("scale", 1))
        if entry.get("value") is None:
            ours = "unavailable"
            notes = str(entry.get("unavailable", ""))
        else:
            ours = _fmt(entry["value"] * scale)
            details = {
                k: v
                for k, v in entry.items()
                if k not in ("value", "unavailable") and not isinstance(v, (dict, list))
            }
            notes = ", ".join(f"{k}: {_fmt(v) if isinstance(v, float) else v}" for k, v in details.items())
        if scale != 1 and entry.get("value") is not None:
            notes = f"×{scale:g} (paper's scale); " + notes
        lines.append(
            f"| {shown}{arrow} | {ours} | {_fmt(ref.get('nextgpt'))} | {ref.get('baseline') or '–'} | "
            f"{notes.replace('|', '/')} |"
        )
    lines += [
        "",
        "Paper: Wu et al., NExT-GPT (ICML 2024), as listed in configs/task/<task>.yaml (paper:). "
        "Numbers are comparable only on the same split, sample count and feature networks.",
        "",
    ]
    return "\n".join(lines)


def log_to_loggers(
    spec: EvalSpec,
    task: TaskSpec,
    result: BenchmarkResult,
    samples: Sequence[Sample],
    records: Mapping[str, Record],
    per_sample: PerSample,
    out: Path,
) -> None:
    """Metrics to every configured logger (``spec.loggers``: a W&B one is named and tagged by the
    task); a table of sample outputs to W&B."""
    if not spec.loggers:
        return
    name = result["task"]
    scalars = {f"{name}/{k}": v["value"] for k, v in result["metrics"].items() if v.get("value") is not None}
    for node in spec.loggers:
        logger = instantiate(dict(node))
        logger.log_metrics(scalars, step=0)
        if "Wandb" in type(logger).__name__:
            _wandb_table(logger, spec.wandb_samples, task, samples, records, per_sample, out)
            logger.experiment.finish()
        else:
            logger.finalize("success")


def _wandb_table(
    logger,
    rows_wanted: int,
    task: TaskSpec,
    samples: Sequence[Sample],
    records: Mapping[str, Record],
    per_sample: PerSample,
    out: Path,
) -> None:
    import wandb  # deferred: wandb costs ~0.5 s to import and only a W&B logger's table needs it

    kinds = {"image": wandb.Image, "audio": wandb.Audio, "video": wandb.Video}
    # metric -> sample id -> score; a metric of several numbers per sample (each frame's) is left out
    tables: dict[str, Mapping[str, object]] = {k: v for k, v in per_sample.items() if isinstance(v, Mapping)}
    scored = [k for k, v in tables.items() if v and not isinstance(next(iter(v.values())), list)]
    columns: list[str | int] = ["id", "input", "references", "output", "signal_groups", *kinds, *scored]
    rows = []
    for s in samples[:rows_wanted]:
        rec: Record = records.get(s.id) or {"id": s.id}
        media_in = s.media if task.kind == "caption" else None
        row: list[object] = [
            s.id,
            rec.get("prompt", ""),
            " | ".join(s.captions),
            rec.get("error") or rec.get("text", ""),
            " ".join(rec.get("signal_groups") or []),
        ]
        for name, kind in kinds.items():
            path = (
                media_in if (media_in is not None and name == task.modality) else media_file(rec, name, out)
            )
            try:
                row.append(kind(str(path)) if path is not None and Path(path).is_file() else None)
            except Exception as e:  # a media type wandb can not read here: keep the path
                log.warning("W&B table: %s not attached (%s)", path, e)
                row.append(None)
        row += [tables[k].get(s.id) for k in scored]
        rows.append(row)
    logger.experiment.log({f"{task.name}/samples": wandb.Table(columns=columns, data=rows)})
