"""The six benchmark tasks of the paper, run on a stage bundle or scored from given outputs
(``python evaluate.py task=...``; the held-out losses and the dispatch live in :mod:`nextgpt.cli.evaluate`).

Benchmark tasks (``configs/task/*.yaml``): the model answers every sample of a benchmark (batched,
with a progress bar), each answer is appended to ``samples.jsonl`` in the run folder as it is
produced and generated media are written to ``generated/<sample id>.<ext>``; a rerun with the same
run folder (``hydra.run.dir=...``) skips what is done. Then the task's metrics are computed, and
``results.json`` + ``results.md`` (ours beside the paper's numbers) are written, plus a W&B table
of sample outputs when a W&B logger is configured. ``predictions=FILE|DIR`` scores given outputs
(COCO results JSON for captioning, a folder of media named by sample id for generation) without
loading any model.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from nextgpt import modality as modality_registry
from nextgpt.bundles import BundleError
from nextgpt.config import ConfigError
from nextgpt.evaluation.batched import BatchedGenerator, Request
from nextgpt.evaluation.readers import BenchmarkError, Sample, read_benchmark
from nextgpt.evaluation.records import (
    BenchmarkResult,
    Record,
    RunSettings,
    batches,
    file_stem,
    task_prompt,
)
from nextgpt.evaluation.report import log_to_loggers, results_markdown
from nextgpt.evaluation.scoring import score
from nextgpt.evaluation.spec import EvalSpec, TaskSpec
from nextgpt.generate import Generator

log = logging.getLogger(__name__)


# =====================================================================================================
# benchmark tasks
# =====================================================================================================
def stage_bundle(checkpoint: str) -> Path:
    """The bundle ``checkpoint=`` names, or a ConfigError naming the key."""
    bundle = Path(checkpoint)
    if not (bundle / "trainable.safetensors").is_file():
        raise ConfigError(
            [f"checkpoint={checkpoint!r}: {bundle} is not a stage bundle (train.py writes them)"]
        )
    return bundle


def _read_jsonl(path: Path) -> dict[str, Record]:
    """Records by sample id; a line cut short by a crash is ignored (that sample is redone)."""
    done: dict[str, Record] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            done[str(rec["id"])] = rec
    return done


def _drop_partial_line(path: Path) -> None:
    """A process killed while writing leaves a last line without its newline: cut it off, so
    that what is appended next starts on a line of its own (that sample is answered again)."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        path.write_bytes(data[: data.rfind(b"\n") + 1])


def _samples(task: TaskSpec) -> list[Sample]:
    """The benchmark's samples, every one of them."""
    b = task.benchmark
    try:
        return read_benchmark(b.reader, b.root, **b.options)
    except BenchmarkError as e:
        raise ConfigError([f"task.benchmark (task {task.name}): {e}"]) from None


def _run_settings(spec: EvalSpec, task: TaskSpec) -> RunSettings:
    """What a run folder's outputs depend on: a resumed run must not mix two settings."""
    return {
        "task": task.name,
        "checkpoint": None if spec.predictions else str(Path(spec.checkpoint).resolve()),
        "prompt": task.prompt,
        "generation": dict(task.generation.recorded),
        "seed": spec.seed,
        "benchmark": dict(task.benchmark.recorded),
    }


def _check_resume(out: Path, settings: RunSettings) -> None:
    path = out / "run.json"
    if path.is_file():
        before = json.loads(path.read_text())
        changed = sorted(k for k, v in settings.items() if before.get(k) != v)
        if changed:
            raise ConfigError(
                [
                    f"hydra.run.dir={out}: holds a run with other {changed} "
                    f"({', '.join(f'{k}={before.get(k)!r}' for k in changed)}); "
                    "use a new run folder to evaluate these settings"
                ]
            )
    else:
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(settings, indent=2))


def run_benchmark(spec: EvalSpec) -> BenchmarkResult:
    task = spec.benchmark_task()
    out = spec.output_dir
    out.mkdir(parents=True, exist_ok=True)
    every = _samples(task)
    samples = every if spec.limit is None else every[: spec.limit]
    generator = None
    if spec.predictions:
        records = records_from_predictions(task, samples, Path(spec.predictions), known=[s.id for s in every])
        with (out / "samples.jsonl").open("w") as f:
            for rec in records.values():
                f.write(json.dumps(rec) + "\n")
    else:
        bundle = stage_bundle(spec.checkpoint)
        _check_resume(out, _run_settings(spec, task))
        generator = _load_generator(bundle, spec.device)
        records = generate_all(spec, task, samples, generator, out)
    metrics, per_sample = score(spec, task, samples, records, generator, out)
    result: BenchmarkResult = {
        "task": task.name,
        "kind": task.kind,
        "modality": task.modality,
        "benchmark": task.benchmark.root,
        "checkpoint": None if spec.predictions else spec.checkpoint,
        "predictions": spec.predictions,
        "samples": len(samples),
        "answered": sum(1 for s in samples if s.id in records and not records[s.id].get("error")),
        "limit": spec.limit,
        "metrics": metrics,
        "paper": dict(task.paper),
    }
    (out / "results.json").write_text(json.dumps(result, indent=2))
    (out / "per_sample.json").write_text(json.dumps(per_sample, indent=2))
    (out / "results.md").write_text(results_markdown(result))
    log_to_loggers(spec, task, result, samples, records, per_sample, out)
    log.info(
        "%s: %s (results in %s)",
        task.name,
        {k: v.get("value") if v.get("value") is not None else "unavailable" for k, v in metrics.items()},
        out,
    )
    return result


def _load_generator(bundle: Path, device: str) -> Generator:
    try:
        return Generator(bundle, device)
    except BundleError as e:
        raise ConfigError([f"checkpoint={str(bundle)!r}: {e}"]) from None


# --- answering ---------------------------------------------------------------------------------------
def generate_all(
    spec: EvalSpec, task: TaskSpec, samples: Sequence[Sample], generator: Generator, out: Path
) -> dict[str, Record]:
    """Answer every sample not yet in ``samples.jsonl``; append each answer as it is produced."""
    gen = task.generation
    jsonl = out / "samples.jsonl"
    _drop_partial_line(jsonl)
    done = _read_jsonl(jsonl)
    todo = [s for s in samples if s.id not in done]
    if done:
        log.info(
            "%s: resuming in %s: %d of %d samples already answered",
            task.name,
            out,
            len(samples) - len(todo),
            len(samples),
        )
    batched = BatchedGenerator(generator)
    captioning = task.captioning
    decode = gen.decode and not captioning

    def answer(chunk: Sequence[Sample]) -> list[Record]:
        requests = [
            Request(
                task_prompt(task, s) if not captioning else task.prompt,
                [s.media] if captioning and s.media is not None else [],
                seed=spec.seed,
            )
            for s in chunk
        ]

        def out_path(i: int, name: str, k: int) -> Path:
            suffix = modality_registry.get(name).output_suffix
            return out / "generated" / f"{file_stem(chunk[i].id)}{'' if k == 0 else f'_{k}'}{suffix}"

        results = batched.generate(
            requests,
            max_new_tokens=gen.max_new_tokens,
            temperature=gen.temperature,
            top_p=gen.top_p,
            decode=decode,
            out_path=out_path,
        )
        return [_record(s, r, req.prompt, out) for s, r, req in zip(chunk, results, requests, strict=False)]

    bar = tqdm(
        total=len(samples), initial=len(samples) - len(todo), desc=f"{task.name}: answering", unit="sample"
    )
    with jsonl.open("a") as f:
        for chunk in batches(todo, spec.batch_size):
            if captioning:
                missing = [s for s in chunk if s.media is None]
                for s in missing:
                    done[s.id] = {
                        "id": s.id,
                        "error": f"media file of sample {s.id} not found under {task.benchmark.root}",
                    }
                    f.write(json.dumps(done[s.id]) + "\n")
                chunk = [s for s in chunk if s.media is not None]
            try:
                records = answer(chunk) if chunk else []
            except Exception as e:  # one bad file must not sink the batch: redo it sample by sample
                log.warning("%s: batch failed (%s); answering its samples one by one", task.name, e)
                records = []
                for s in chunk:
                    try:
                        records += answer([s])
                    except Exception as e1:
                        records.append({"id": s.id, "error": f"{type(e1).__name__}: {e1}"})
            for rec in records:
                done[rec["id"]] = rec
                f.write(json.dumps(rec) + "\n")
            f.flush()
            bar.update(len(chunk) + (len(missing) if captioning else 0))
    bar.close()
    return done


def _strip_placeholders(text: str) -> str:
    names = "|".join(modality_registry.names())
    return " ".join(re.sub(rf"<({names})>", " ", text).split())


def _record(sample: Sample, res, prompt: str, out: Path) -> Record:
    return {
        "id": sample.id,
        "prompt": prompt,
        "text": res.text,
        "caption": _strip_placeholders(res.text),
        "signal_groups": list(res.signal_groups),
        "files": {k: [str(Path(p).relative_to(out)) for p in v] for k, v in res.files.items()},
        "notes": list(res.notes),
        "new_tokens": res.new_tokens,
        "seconds": round(res.seconds, 4),
    }


def _some(ids: Sequence, quote: bool = True) -> str:
    """The first few of ``ids`` and how many there are, for a message."""
    shown = ", ".join(repr(i) if quote else str(i) for i in list(ids)[:5])
    return f"{shown}{', ...' if len(ids) > 5 else ''} ({len(ids)} in all)"


def _caption_file_errors(path: Path, data: list[dict], known: set[str]) -> list[str]:
    """What makes a COCO results file unscorable: an id given twice, an id the benchmark does not
    have, a caption that is not a string."""
    where = f"predictions={str(path)!r}"
    seen: dict[str, int] = {}
    for d in data:
        seen[str(d["image_id"])] = seen.get(str(d["image_id"]), 0) + 1
    errors = []
    twice = [i for i, n in seen.items() if n > 1]
    if twice:
        errors.append(
            f"{where}: image_id given more than once: {_some(twice)}; each sample takes one caption"
        )
    unknown = [i for i in seen if i not in known]
    if unknown:
        errors.append(
            f"{where}: image_id not in the benchmark: {_some(unknown)} (it has {len(known)} samples)"
        )
    not_text = [
        f"{str(d['image_id'])!r}: {json.dumps(d['caption'])}"
        for d in data
        if not isinstance(d["caption"], str)
    ]
    if not_text:
        errors.append(f"{where}: caption is not a string for image_id {_some(not_text, quote=False)}")
    return errors


def records_from_predictions(
    task: TaskSpec, samples: Sequence[Sample], path: Path, known: Sequence[str] | None = None
) -> dict[str, Record]:
    """Outputs of any system, keyed like ours: captions from a COCO results file, or media files
    named ``<sample id>.<ext>`` in a folder. ``known``: every sample id of the benchmark (``samples``
    may be the first ``limit=`` of them); a caption file naming another id is refused, as is an id
    given twice, a caption that is not a string, and outputs that match none of ``samples``."""
    records: dict[str, Record] = {}
    wanted = f"none of the samples scored: {_some([s.id for s in samples])}"
    if task.kind == "caption":
        if not path.is_file():
            raise ConfigError(
                [
                    f"predictions={str(path)!r}: not a file (captioning takes a COCO results JSON "
                    '[{"image_id": ..., "caption": ...}])'
                ]
            )
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError([f"predictions={str(path)!r}: not valid JSON ({e})"]) from None
        if not isinstance(data, list) or not all(
            isinstance(d, dict) and "image_id" in d and "caption" in d for d in data
        ):
            raise ConfigError(
                [
                    f"predictions={str(path)!r}: expected the COCO results format "
                    '[{"image_id": ..., "caption": ...}, ...]'
                ]
            )
        errors = _caption_file_errors(
            path, data, set(known if known is not None else (s.id for s in samples))
        )
        if errors:
            raise ConfigError(errors)
        captions = {str(d["image_id"]): d["caption"] for d in data}
        for s in samples:
            if s.id in captions:
                records[s.id] = {"id": s.id, "text": captions[s.id], "caption": captions[s.id]}
        if not records:
            raise ConfigError([f"predictions={str(path)!r}: its {len(data)} caption(s) match {wanted}"])
        return records
    if not path.is_dir():
        raise ConfigError(
            [
                f"predictions={str(path)!r}: not a folder (generation takes a folder of media named <sample id>.<ext>)"
            ]
        )
    mod = modality_registry.get(task.modality)
    for s in samples:
        found = next(
            (
                path / f"{file_stem(s.id)}{ext}"
                for ext in mod.extensions
                if (path / f"{file_stem(s.id)}{ext}").is_file()
            ),
            None,
        )
        if found is not None:
            records[s.id] = {"id": s.id, "prompt": s.caption, "files": {mod.name: [str(found.resolve())]}}
    if not records:
        raise ConfigError(
            [
                f"predictions={str(path)!r}: no file named <sample id>{{{','.join(mod.extensions)}}} "
                f"there: it matches {wanted}"
            ]
        )
    return records


# --- scoring -----------------------------------------------------------------------------------------
