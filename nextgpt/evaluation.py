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
import math
import re
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from nextgpt import modality as modality_registry
from nextgpt.config import ConfigError
from nextgpt.metrics import Unavailable, value

log = logging.getLogger(__name__)

KINDS = ("caption", "generate")  # caption: X -> text; generate: text -> X
# metric -> (shown as, better); anything not listed is shown by its name
METRIC_INFO: dict[str, tuple[str, str]] = {
    "bleu1": ("BLEU-1", "higher"), "bleu2": ("BLEU-2", "higher"), "bleu3": ("BLEU-3", "higher"),
    "bleu4": ("BLEU-4", "higher"), "meteor": ("METEOR", "higher"), "rouge_l": ("ROUGE-L", "higher"),
    "cider": ("CIDEr", "higher"), "spice": ("SPICE", "higher"), "spider": ("SPIDEr", "higher"),
    "fid": ("FID", "lower"), "fad": ("FAD", "lower"), "clip_score": ("CLIP score", "higher"),
    "clap_score": ("CLAP score", "higher"), "clipsim": ("CLIPSIM", "higher"),
    "trigger_rate": ("signal trigger rate", "higher"), "align_loss": ("alignment loss (held-out captions)", "lower"),
    "caption_ce": ("caption cross-entropy (held-out)", "lower"),
}
NO_MODEL = "predictions= scores given outputs without a model; {what} is measured only when evaluate.py runs the model"


# =====================================================================================================
# benchmark tasks
# =====================================================================================================
def stage_bundle(cfg: DictConfig) -> Path:
    """The bundle ``checkpoint=`` names, or a ConfigError naming the key."""
    bundle = Path(cfg.checkpoint)
    if not (bundle / "trainable.safetensors").is_file():
        raise ConfigError([f"checkpoint={cfg.checkpoint!r}: {bundle} is not a stage bundle (train.py writes them)"])
    return bundle


def file_stem(sample_id: str) -> str:
    """A sample id as a file name (ids are COCO numbers, YouTube ids, ``video7010``)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", str(sample_id))


def _batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _read_jsonl(path: Path) -> dict[str, dict]:
    """Records by sample id; a line cut short by a crash is ignored (that sample is redone)."""
    done: dict[str, dict] = {}
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


def _samples(cfg: DictConfig):
    from nextgpt.benchmarks import BenchmarkError, read_benchmark

    b = cfg.task.benchmark
    try:
        samples = read_benchmark(b.reader, b.root, **OmegaConf.to_container(b.get("options") or {}, resolve=True))
    except BenchmarkError as e:
        raise ConfigError([f"task.benchmark (task {cfg.task.name}): {e}"]) from None
    if cfg.limit is not None:
        samples = samples[: int(cfg.limit)]
    return samples


def task_prompt(task: DictConfig, sample) -> str:
    """The task's request with the sample's caption put in as a phrase ("A dog runs." -> "a dog runs")."""
    caption = sample.caption.strip().rstrip(".")
    if caption[:1].isupper() and not caption[1:2].isupper():
        caption = caption[0].lower() + caption[1:]
    return str(task.prompt).format(caption=caption)


def _run_settings(cfg: DictConfig) -> dict:
    """What a run folder's outputs depend on: a resumed run must not mix two settings."""
    t = cfg.task
    return {"task": t.name, "checkpoint": None if cfg.predictions else str(Path(cfg.checkpoint).resolve()),
            "prompt": str(t.prompt), "generation": OmegaConf.to_container(t.generation, resolve=True), "seed": int(cfg.seed),
            "benchmark": OmegaConf.to_container(t.benchmark, resolve=True)}


def _check_resume(out: Path, settings: dict) -> None:
    path = out / "run.json"
    if path.is_file():
        before = json.loads(path.read_text())
        changed = sorted(k for k in settings if before.get(k) != settings[k])
        if changed:
            raise ConfigError([f"hydra.run.dir={out}: holds a run with other {changed} ({', '.join(f'{k}={before.get(k)!r}' for k in changed)}); "
                               "use a new run folder to evaluate these settings"])
    else:
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(settings, indent=2))


def run_benchmark(cfg: DictConfig) -> dict:
    task = cfg.task
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    samples = _samples(cfg)
    generator = None
    if cfg.predictions:
        records = records_from_predictions(task, samples, Path(cfg.predictions))
        with (out / "samples.jsonl").open("w") as f:
            for rec in records.values():
                f.write(json.dumps(rec) + "\n")
    else:
        bundle = stage_bundle(cfg)
        _check_resume(out, _run_settings(cfg))
        generator = _load_generator(bundle, cfg.device)
        records = generate_all(cfg, samples, generator, out)
    metrics, per_sample = score(cfg, samples, records, generator, out)
    result = {
        "task": task.name, "kind": task.kind, "modality": task.modality, "benchmark": str(task.benchmark.root),
        "checkpoint": None if cfg.predictions else str(cfg.checkpoint), "predictions": cfg.predictions,
        "samples": len(samples), "answered": sum(1 for s in samples if s.id in records and not records[s.id].get("error")),
        "limit": cfg.limit, "metrics": metrics,
        "paper": OmegaConf.to_container(task.get("paper") or {}, resolve=True),
    }
    (out / "results.json").write_text(json.dumps(result, indent=2))
    (out / "per_sample.json").write_text(json.dumps(per_sample, indent=2))
    (out / "results.md").write_text(results_markdown(result))
    _log_to_loggers(cfg, result, samples, records, per_sample, out)
    log.info("%s: %s (results in %s)", task.name,
             {k: v.get("value") if v.get("value") is not None else "unavailable" for k, v in metrics.items()}, out)
    return result


def _load_generator(bundle: Path, device: str):
    from nextgpt.bundles import BundleError
    from nextgpt.generate import Generator

    try:
        return Generator(bundle, device)
    except BundleError as e:
        raise ConfigError([f"checkpoint={str(bundle)!r}: {e}"]) from None


# --- answering ---------------------------------------------------------------------------------------
def generate_all(cfg: DictConfig, samples: Sequence, generator, out: Path) -> dict[str, dict]:
    """Answer every sample not yet in ``samples.jsonl``; append each answer as it is produced."""
    from nextgpt.benchmarks.generation import BatchedGenerator, Request

    task = cfg.task
    gen = task.generation
    jsonl = out / "samples.jsonl"
    _drop_partial_line(jsonl)
    done = _read_jsonl(jsonl)
    todo = [s for s in samples if s.id not in done]
    if done:
        log.info("%s: resuming in %s: %d of %d samples already answered", task.name, out, len(samples) - len(todo), len(samples))
    batched = BatchedGenerator(generator)
    captioning = task.kind == "caption"
    decode = bool(gen.get("decode", True)) and not captioning

    def answer(chunk: Sequence) -> list[dict]:
        requests = [Request(task_prompt(task, s) if not captioning else str(task.prompt),
                            [s.media] if captioning else [], seed=int(cfg.seed)) for s in chunk]

        def out_path(i: int, name: str, k: int) -> Path:
            suffix = modality_registry.get(name).output_suffix
            return out / "generated" / f"{file_stem(chunk[i].id)}{'' if k == 0 else f'_{k}'}{suffix}"

        results = batched.generate(requests, max_new_tokens=int(gen.max_new_tokens), temperature=float(gen.temperature),
                                   top_p=float(gen.top_p), decode=decode, out_path=out_path)
        return [_record(s, r, req.prompt, out) for s, r, req in zip(chunk, results, requests)]

    bar = tqdm(total=len(samples), initial=len(samples) - len(todo), desc=f"{task.name}: answering", unit="sample")
    with jsonl.open("a") as f:
        for chunk in _batches(todo, int(cfg.batch_size)):
            if captioning:
                missing = [s for s in chunk if s.media is None]
                for s in missing:
                    done[s.id] = {"id": s.id, "error": f"media file of sample {s.id} not found under {task.benchmark.root}"}
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


def _record(sample, res, prompt: str, out: Path) -> dict:
    return {
        "id": sample.id, "prompt": prompt, "text": res.text, "caption": _strip_placeholders(res.text),
        "signal_groups": list(res.signal_groups),
        "files": {k: [str(Path(p).relative_to(out)) for p in v] for k, v in res.files.items()},
        "notes": list(res.notes), "new_tokens": res.new_tokens, "seconds": round(res.seconds, 4),
    }


def records_from_predictions(task: DictConfig, samples: Sequence, path: Path) -> dict[str, dict]:
    """Outputs of any system, keyed like ours: captions from a COCO results file, or media files
    named ``<sample id>.<ext>`` in a folder."""
    records: dict[str, dict] = {}
    if task.kind == "caption":
        if not path.is_file():
            raise ConfigError([f"predictions={str(path)!r}: not a file (captioning takes a COCO results JSON "
                               '[{"image_id": ..., "caption": ...}])'])
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError([f"predictions={str(path)!r}: not valid JSON ({e})"]) from None
        if not isinstance(data, list) or not all(isinstance(d, dict) and "image_id" in d and "caption" in d for d in data):
            raise ConfigError([f"predictions={str(path)!r}: expected the COCO results format "
                               '[{"image_id": ..., "caption": ...}, ...]'])
        captions = {str(d["image_id"]): str(d["caption"]) for d in data}
        for s in samples:
            if s.id in captions:
                records[s.id] = {"id": s.id, "text": captions[s.id], "caption": captions[s.id]}
        return records
    if not path.is_dir():
        raise ConfigError([f"predictions={str(path)!r}: not a folder (generation takes a folder of media named <sample id>.<ext>)"])
    mod = modality_registry.get(task.modality)
    for s in samples:
        found = next((path / f"{file_stem(s.id)}{ext}" for ext in mod.extensions if (path / f"{file_stem(s.id)}{ext}").is_file()), None)
        if found is not None:
            records[s.id] = {"id": s.id, "prompt": s.caption, "files": {mod.name: [str(found.resolve())]}}
    return records


# --- scoring -----------------------------------------------------------------------------------------
def _media_file(rec: dict, name: str, out: Path) -> Path | None:
    files = (rec.get("files") or {}).get(name) or []
    if not files:
        return None
    p = Path(files[0])
    return p if p.is_absolute() else out / p


def score(cfg: DictConfig, samples: Sequence, records: Mapping[str, dict], generator, out: Path):
    """metric -> entry of results.json; and per-sample scores (metric -> id -> score)."""
    task = cfg.task
    wanted = list(task.metrics)
    answered = [s for s in samples if s.id in records and not records[s.id].get("error")]
    metrics: dict[str, dict] = {}
    per_sample: dict[str, dict[str, float]] = {}
    if task.kind == "caption":
        metrics.update(_caption_metrics(cfg, wanted, answered, records))
    else:
        metrics.update(_generation_metrics(cfg, wanted, samples, answered, records, out, per_sample))
    if "trigger_rate" in wanted:
        metrics["trigger_rate"] = _trigger(cfg, answered, records)
    for loss in ("align_loss", "caption_ce"):
        if loss in wanted:
            if generator is None:
                metrics[loss] = value(unavailable=NO_MODEL.format(what="a held-out loss"))
            else:
                metrics[loss] = _heldout(cfg, generator, samples, loss)
    unknown = [m for m in wanted if m not in metrics]
    for m in unknown:
        metrics[m] = value(unavailable=f"unknown metric {m!r} for a {task.kind} task")
    return {m: metrics[m] for m in wanted}, per_sample


def _caption_metrics(cfg: DictConfig, wanted: list[str], answered: Sequence, records: Mapping[str, dict]) -> dict:
    from nextgpt.metrics.captioning import COCO_NAMES, caption_scores

    names = [m for m in wanted if m in COCO_NAMES]
    if not names:
        return {}
    refs = {s.id: s.captions for s in answered}
    preds = {s.id: records[s.id]["caption"] for s in answered}
    scores = caption_scores(refs, preds, names, spice_corenlp=cfg.metrics.get("spice_corenlp"))
    out = {}
    for m, v in scores.items():
        out[m] = value(unavailable=str(v)) if isinstance(v, Unavailable) else value(v, samples=len(answered))
    return out


def _trigger(cfg: DictConfig, answered: Sequence, records: Mapping[str, dict]) -> dict:
    from nextgpt.metrics.signals import trigger_rates

    if cfg.predictions:
        return value(unavailable=NO_MODEL.format(what="the signal-token trigger rate"))
    expected = None if cfg.task.kind == "caption" else str(cfg.task.modality)
    rates = trigger_rates([records[s.id].get("signal_groups") or [] for s in answered], expected)
    return value(rates.pop("trigger_rate", None), **rates)


def _generation_metrics(cfg: DictConfig, wanted: list[str], samples: Sequence, answered: Sequence,
                        records: Mapping[str, dict], out: Path, per_sample: dict) -> dict:
    task = cfg.task
    name = str(task.modality)
    feature_metrics = [m for m in wanted if m in GENERATION_METRICS]
    if not feature_metrics:
        return {}
    if not cfg.predictions and not bool(task.generation.get("decode", True)):
        return {m: value(unavailable="task.generation.decode=false: no media were generated") for m in feature_metrics}
    generated = [(s, _media_file(records[s.id], name, out)) for s in answered]
    generated = [(s, p) for s, p in generated if p is not None and p.is_file()]
    coverage = {"generated": len(generated), "samples": len(samples)}
    results = {}
    for m in feature_metrics:
        try:
            results[m] = GENERATION_METRICS[m](cfg, samples, generated, per_sample)
            results[m].update({k: v for k, v in coverage.items() if k not in results[m]})
        except Unavailable as e:
            results[m] = value(unavailable=str(e), **coverage)
    return results


def _need(items: Sequence, what: str) -> None:
    if len(items) < 2:
        raise Unavailable(f"needs at least 2 {what}; got {len(items)}")


def _fid(cfg, samples, generated, per_sample) -> dict:
    from PIL import Image

    from nextgpt.metrics.frechet import frechet_distance_of
    from nextgpt.metrics.inception import load_fid_inception
    from nextgpt.metrics.media import read_image, square_crop, to_tensor

    model = load_fid_inception(cfg.feature_nets.inception, cfg.device)
    reference = [s.media for s in samples if s.media is not None]
    _need([p for _, p in generated], "generated images")
    _need(reference, "reference images")
    size = int(cfg.metrics.get("fid_image_size", 299))

    @torch.no_grad()
    def features(paths: Sequence[Path], desc: str) -> np.ndarray:
        out = []
        for chunk in tqdm(list(_batches(list(paths), 16)), desc=desc, leave=False):
            x = to_tensor([square_crop(read_image(p), size, resample=Image.BILINEAR) for p in chunk]).to(cfg.device)
            out.append(model(x).cpu().numpy())
        return np.concatenate(out)

    fid = frechet_distance_of(features([p for _, p in generated], "FID: generated"), features(reference, "FID: reference"))
    note = "fewer than 2048 images per set: FID is biased upwards; compare only runs of equal size" if min(len(generated), len(reference)) < 2048 else None
    return value(fid, reference=len(reference), backbone="InceptionV3 pool3 (pytorch-fid weights)", **({"note": note} if note else {}))


def _clip_score(cfg, samples, generated, per_sample) -> dict:
    from nextgpt.metrics.embedders import ClipEmbedder, clip_score
    from nextgpt.metrics.media import read_image

    if not generated:
        raise Unavailable("no sample produced an image")
    clip = ClipEmbedder(cfg.feature_nets.clip, cfg.device)
    scores = clip_score(clip.images([read_image(p) for _, p in generated]), clip.texts([s.caption for s, _ in generated]))
    per_sample["clip_score"] = {s.id: float(v) for (s, _), v in zip(generated, scores)}
    return value(float(scores.mean()), backbone=str(cfg.feature_nets.clip))


def _clipsim(cfg, samples, generated, per_sample) -> dict:
    from nextgpt.metrics.embedders import ClipEmbedder, clip_score
    from nextgpt.metrics.media import read_video_frames

    if not generated:
        raise Unavailable("no sample produced a video")
    clip = ClipEmbedder(cfg.feature_nets.clip, cfg.device)
    max_frames = cfg.metrics.get("max_video_frames")
    per_video, per_frame = [], {}
    for s, p in tqdm(generated, desc="CLIPSIM", leave=False):
        frames = read_video_frames(p, int(max_frames) if max_frames else None)
        text = clip.texts([s.caption])
        sims = clip_score(clip.images(frames), np.repeat(text, len(frames), axis=0))
        per_frame[s.id] = [round(float(v), 4) for v in sims]
        per_video.append(float(sims.mean()))
    per_sample["clipsim"] = {s.id: v for (s, _), v in zip(generated, per_video)}
    per_sample["clipsim_frames"] = per_frame
    return value(float(np.mean(per_video)), backbone=str(cfg.feature_nets.clip),
                 frames_per_video=float(np.mean([len(v) for v in per_frame.values()])))


def _audio_embedder(cfg):
    backbone = str(cfg.metrics.get("fad_backbone", "vggish"))
    if backbone == "vggish":
        from nextgpt.metrics.vggish import load_vggish

        model = load_vggish(cfg.feature_nets.vggish, cfg.device)
        return "VGGish (128-d, per 0.96 s frame)", lambda waves: np.concatenate([model.embed(w, r) for w, r in waves])
    if backbone == "clap":
        from nextgpt.metrics.embedders import ClapEmbedder

        clap = ClapEmbedder(cfg.feature_nets.clap, cfg.device)
        return f"CLAP audio embedding ({cfg.feature_nets.clap})", clap.audios
    raise Unavailable(f"metrics.fad_backbone={backbone!r}: must be vggish or clap")


def _fad(cfg, samples, generated, per_sample) -> dict:
    from nextgpt.metrics.frechet import frechet_distance_of
    from nextgpt.metrics.media import read_wave

    reference = [s.media for s in samples if s.media is not None]
    _need(generated, "generated clips")
    _need(reference, "reference clips")
    backbone, embed = _audio_embedder(cfg)
    gen = embed([read_wave(p) for _, p in tqdm(generated, desc="FAD: generated", leave=False)])
    ref = embed([read_wave(p) for p in tqdm(reference, desc="FAD: reference", leave=False)])
    return value(frechet_distance_of(gen, ref), reference=len(reference), backbone=backbone)


def _clap_score(cfg, samples, generated, per_sample) -> dict:
    from nextgpt.metrics.embedders import ClapEmbedder, clip_score
    from nextgpt.metrics.media import read_wave

    if not generated:
        raise Unavailable("no sample produced an audio clip")
    clap = ClapEmbedder(cfg.feature_nets.clap, cfg.device)
    scores = clip_score(clap.audios([read_wave(p) for _, p in generated]), clap.texts([s.caption for s, _ in generated]))
    per_sample["clap_score"] = {s.id: float(v) for (s, _), v in zip(generated, scores)}
    return value(float(scores.mean()), backbone=str(cfg.feature_nets.clap))


GENERATION_METRICS = {"fid": _fid, "clip_score": _clip_score, "clipsim": _clipsim, "fad": _fad, "clap_score": _clap_score}


# --- held-out losses of the benchmark's own captions (teacher-forced) --------------------------------
@torch.no_grad()
def _heldout(cfg: DictConfig, generator, samples: Sequence, loss: str) -> dict:
    """``align_loss``: the model is shown "prompt -> answer with the signal group" for each caption
    and its projected group is compared with the decoder's text embedding of the caption (the
    stage-2/3 alignment loss). ``caption_ce``: cross-entropy of the reference caption given the media."""
    import torch.nn.functional as F

    from nextgpt.batch import collate_conversations
    from nextgpt.generate import with_placeholders
    from nextgpt.prompts import IGNORE_INDEX, Conversation

    task, g = cfg.task, generator
    name = str(task.modality)
    if loss == "align_loss" and task.kind != "generate":
        return value(unavailable="align_loss applies to text-to-X tasks")
    if loss == "caption_ce" and task.kind != "caption":
        return value(unavailable="caption_ce applies to X-to-text tasks")
    convs = []
    for s in samples:
        if task.kind == "generate":
            convs.append(Conversation(s.id, [(task_prompt(task, s), str(task.answer))], captions_out=[(name, s.caption)]))
        elif s.media is not None:
            prompt = with_placeholders(str(task.prompt), [s.media])
            convs.append(Conversation(s.id, [(prompt, s.caption)], media_in=[(name, str(s.media))]))
    total = count = 0.0
    for chunk in tqdm(list(_batches(convs, int(cfg.batch_size))), desc=f"{task.name}: {loss}", leave=False):
        dev = g.device
        batch = collate_conversations(chunk, g.tokenizer, g.model.layout, g.template.name,
                                      num_media_tokens=g.num_media_tokens, max_length=g.max_context, device=dev)
        labels = batch["labels"]
        outs = g.model(**batch)
        if loss == "caption_ce":
            target = labels[:, 1:]
            total += float(F.cross_entropy(outs.logits[:, :-1].flatten(0, 1).float(), target.flatten(),
                                           ignore_index=IGNORE_INDEX, reduction="sum"))
            count += int((target != IGNORE_INDEX).sum())
        else:
            cond = outs.conditioning.get(name)
            if cond is None:
                continue
            target = g.conditioners[name].to(dev).encode([c.captions_out[0][1] for c in chunk])
            total += float((cond.float() - target.float()).norm(dim=-1).mean(-1).sum())
            count += cond.shape[0]
    if not count:
        return value(unavailable="no sample to score")
    return value(total / count, samples=len(convs), **({"perplexity": math.exp(min(total / count, 50.0))} if loss == "caption_ce" else {}))


# =====================================================================================================
# results
# =====================================================================================================
def _fmt(v: float | None) -> str:
    if v is None:
        return "–"
    return f"{v:.4g}" if abs(v) < 1000 else f"{v:.1f}"


def results_markdown(result: Mapping[str, Any]) -> str:
    """Our numbers beside the paper's (REFERENCE section 9), on the paper's scale."""
    paper = result.get("paper") or {}
    lines = [
        f"# {result['task']}: {result['kind']} ({result['modality']})",
        "",
        f"- benchmark: `{result['benchmark']}`, {result['samples']} samples"
        + (f" (limit={result['limit']})" if result.get("limit") is not None else "")
        + f", {result['answered']} answered",
        f"- {'predictions: `' + str(result['predictions']) + '`' if result.get('predictions') else 'checkpoint: `' + str(result['checkpoint']) + '`'}",
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
            details = {k: v for k, v in entry.items() if k not in ("value", "unavailable") and not isinstance(v, (dict, list))}
            notes = ", ".join(f"{k}: {_fmt(v) if isinstance(v, float) else v}" for k, v in details.items())
        if scale != 1 and entry.get("value") is not None:
            notes = f"×{scale:g} (paper's scale); " + notes
        lines.append(f"| {shown}{arrow} | {ours} | {_fmt(ref.get('nextgpt'))} | {ref.get('baseline') or '–'} | "
                     f"{notes.replace('|', '/')} |")
    lines += ["", "Paper: Wu et al., NExT-GPT (ICML 2024), as listed in REFERENCE.md section 9. "
              "Numbers are comparable only on the same split, sample count and feature networks.", ""]
    return "\n".join(lines)


def _log_to_loggers(cfg: DictConfig, result: dict, samples: Sequence, records: Mapping[str, dict],
                    per_sample: Mapping[str, Mapping[str, Any]], out: Path) -> None:
    """Metrics to every configured logger; a table of sample outputs to W&B."""
    logger_cfg = cfg.get("logger")
    if not logger_cfg:
        return
    from hydra.utils import instantiate

    task = result["task"]
    scalars = {f"{task}/{k}": v["value"] for k, v in result["metrics"].items() if v.get("value") is not None}
    for lc in logger_cfg.values():
        overrides = {"name": f"eval-{task}", "tags": ["evaluate", task]} if "Wandb" in str(lc.get("_target_", "")) else {}
        logger = instantiate(lc, **overrides)
        logger.log_metrics(scalars, step=0)
        if "Wandb" in type(logger).__name__:
            _wandb_table(logger, cfg, samples, records, per_sample, out)
            logger.experiment.finish()
        else:
            logger.finalize("success")


def _wandb_table(logger, cfg: DictConfig, samples: Sequence, records: Mapping[str, dict],
                 per_sample: Mapping[str, Mapping[str, Any]], out: Path) -> None:
    import wandb

    task = cfg.task
    kinds = {"image": wandb.Image, "audio": wandb.Audio, "video": wandb.Video}
    scored = [k for k, v in per_sample.items() if v and not isinstance(next(iter(v.values())), list)]
    columns = ["id", "input", "references", "output", "signal_groups", *kinds, *scored]
    rows = []
    for s in samples[: int(cfg.get("wandb_samples", 16))]:
        rec = records.get(s.id) or {}
        media_in = s.media if task.kind == "caption" else None
        row = [s.id, rec.get("prompt", ""), " | ".join(s.captions), rec.get("error") or rec.get("text", ""),
               " ".join(rec.get("signal_groups") or [])]
        for name, kind in kinds.items():
            path = media_in if (media_in is not None and name == task.modality) else _media_file(rec, name, out)
            try:
                row.append(kind(str(path)) if path is not None and Path(path).is_file() else None)
            except Exception as e:  # a media type wandb can not read here: keep the path
                log.warning("W&B table: %s not attached (%s)", path, e)
                row.append(None)
        row += [per_sample[k].get(s.id) for k in scored]
        rows.append(row)
    logger.experiment.log({f"{task.name}/samples": wandb.Table(columns=columns, data=rows)})
