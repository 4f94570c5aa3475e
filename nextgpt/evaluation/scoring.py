"""The metrics of a benchmark task over its answered samples: captioning scores, generation scores
(FID, CLIP score, CLIPSIM, FAD, CLAP score), the signal trigger rate and the held-out losses."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from nextgpt import modality as modality_registry
from nextgpt.batch import collate_conversations
from nextgpt.evaluation.readers import Sample
from nextgpt.evaluation.records import NO_MODEL, PerSample, Record, batches, media_file, task_prompt
from nextgpt.evaluation.spec import EvalSpec, MetricSettings, TaskSpec
from nextgpt.generate import Generator, with_placeholders
from nextgpt.losses import alignment_sum, caption_loss_sum
from nextgpt.metrics import Unavailable, value
from nextgpt.metrics.captioning import COCO_NAMES, caption_scores
from nextgpt.metrics.embedders import ClapEmbedder, ClipEmbedder, clip_score
from nextgpt.metrics.frechet import frechet_distance_of
from nextgpt.metrics.inception import load_fid_inception
from nextgpt.metrics.media import read_image, read_video_frames, read_wave, square_crop, to_tensor
from nextgpt.metrics.signals import trigger_rates
from nextgpt.metrics.vggish import load_vggish
from nextgpt.prompts import IGNORE_INDEX, Conversation

log = logging.getLogger(__name__)


Entry = dict[str, Any]  # a metric's entry of results.json (nextgpt.metrics.value)


def score(
    spec: EvalSpec,
    task: TaskSpec,
    samples: Sequence[Sample],
    records: Mapping[str, Record],
    generator: Generator | None,
    out: Path,
) -> tuple[dict[str, Entry], PerSample]:
    """metric -> entry of results.json; and per-sample scores (metric -> id -> score)."""
    wanted = list(task.metrics)
    answered = [s for s in samples if s.id in records and not records[s.id].get("error")]
    metrics: dict[str, Entry] = {}
    per_sample: PerSample = {}
    if task.kind == "caption":
        metrics.update(_caption_metrics(spec.metrics, wanted, answered, records))
    else:
        metrics.update(_generation_metrics(spec, task, wanted, samples, answered, records, out, per_sample))
    if "world_attributes" in wanted:
        metrics["world_attributes"] = _world_attributes(
            spec, task, samples, answered, records, generator, out, per_sample
        )
    if "trigger_rate" in wanted:
        metrics["trigger_rate"] = _trigger(spec, task, answered, records)
    for loss in ("align_loss", "caption_ce"):
        if loss in wanted:
            if generator is None:
                metrics[loss] = value(unavailable=NO_MODEL.format(what="a held-out loss"))
            else:
                metrics[loss] = _heldout(spec, task, generator, samples, loss)
    unknown = [m for m in wanted if m not in metrics]
    for m in unknown:
        metrics[m] = value(unavailable=f"unknown metric {m!r} for a {task.kind} task")
    return {m: metrics[m] for m in wanted}, per_sample


def _caption_metrics(
    settings: MetricSettings, wanted: list[str], answered: Sequence[Sample], records: Mapping[str, Record]
) -> dict[str, Entry]:
    names = [m for m in wanted if m in COCO_NAMES]
    if not names:
        return {}
    refs = {s.id: s.captions for s in answered}
    preds = {s.id: records[s.id]["caption"] for s in answered}
    scores = caption_scores(refs, preds, names, spice_corenlp=settings.spice_corenlp)
    out = {}
    for m, v in scores.items():
        out[m] = value(unavailable=str(v)) if isinstance(v, Unavailable) else value(v, samples=len(answered))
    return out


def _world_attributes(
    spec: EvalSpec,
    task: TaskSpec,
    samples: Sequence[Sample],
    answered: Sequence[Sample],
    records: Mapping[str, Record],
    generator: Generator | None,
    out: Path,
    per_sample: PerSample,
) -> Entry:
    """How often the answer states each attribute of the item (``nextgpt.world``): read from the
    generated caption (X -> text), or from the generated media by the world's analysers (text -> X),
    over every sample (an unanswered one counts as wrong), beside chance and, for generation, the
    decoder alone given the true caption (what the output projector can reach at best)."""
    from nextgpt.world.analysers import file_attributes  # deferred: real-weights runs never load the world
    from nextgpt.world.attributes import caption_attributes, chance  # deferred: real weights never load world

    name = task.modality

    def stated(sample: Sample) -> dict:
        rec = records.get(sample.id)
        if rec is None or rec.get("error"):
            return {}
        if task.kind == "caption":
            return caption_attributes(rec["caption"], name)
        path = media_file(rec, name, out)
        return file_attributes(path, name) if path is not None and path.is_file() else {}

    def accuracy(found: Mapping[str, dict]) -> dict[str, float]:
        truth = {s.id: caption_attributes(s.caption, name) for s in samples}
        return {
            a: sum(found[s.id].get(a) == truth[s.id][a] for s in samples) / len(samples)
            for a in truth[samples[0].id]
        }

    found = {s.id: stated(s) for s in tqdm(samples, desc=f"{task.name}: world attributes", unit="sample")}
    acc = accuracy(found)
    per_sample["world_attributes"] = {s.id: found[s.id] for s in samples}
    extra: dict = {"by_attribute": acc, "chance": chance(name), "samples": len(samples)}
    if task.kind != "caption":
        if generator is None:
            extra["ceiling"] = NO_MODEL.format(what="the decoder-alone ceiling")
        else:
            mod = modality_registry.get(name)
            folder = out / "decoder_alone"
            folder.mkdir(parents=True, exist_ok=True)
            alone = {}
            for s in tqdm(samples, desc=f"{task.name}: decoder alone", unit="sample"):
                path = folder / f"{s.id}{mod.output_suffix}"
                if not path.is_file():
                    array = generator.decode_caption(name, s.caption, spec.seed)
                    mod.write(
                        array, path, generator.pipeline(name), {"caption": s.caption, "decoder_alone": True}
                    )
                alone[s.id] = file_attributes(path, name)
            extra["ceiling"] = accuracy(alone)
    return value(sum(acc.values()) / len(acc), **extra)


def _trigger(
    spec: EvalSpec, task: TaskSpec, answered: Sequence[Sample], records: Mapping[str, Record]
) -> Entry:
    if spec.predictions:
        return value(unavailable=NO_MODEL.format(what="the signal-token trigger rate"))
    expected = None if task.kind == "caption" else task.modality
    rates: dict[str, Any] = dict(
        trigger_rates([records[s.id].get("signal_groups") or [] for s in answered], expected)
    )
    return value(rates.pop("trigger_rate", None), **rates)


def _generation_metrics(
    spec: EvalSpec,
    task: TaskSpec,
    wanted: list[str],
    samples: Sequence[Sample],
    answered: Sequence[Sample],
    records: Mapping[str, Record],
    out: Path,
    per_sample: PerSample,
) -> dict[str, Entry]:
    name = task.modality
    feature_metrics = [m for m in wanted if m in GENERATION_METRICS]
    if not feature_metrics:
        return {}
    if not spec.predictions and not task.generation.decode:
        return {
            m: value(unavailable="task.generation.decode=false: no media were generated")
            for m in feature_metrics
        }
    found = [(s, media_file(records[s.id], name, out)) for s in answered]
    generated = [(s, p) for s, p in found if p is not None and p.is_file()]
    coverage = {"generated": len(generated), "samples": len(samples)}
    results: dict[str, Entry] = {}
    for m in feature_metrics:
        try:
            results[m] = GENERATION_METRICS[m](spec.metrics, spec.device, samples, generated, per_sample)
            results[m].update({k: v for k, v in coverage.items() if k not in results[m]})
        except Unavailable as e:
            results[m] = value(unavailable=str(e), **coverage)
    return results


def _need(items: Sequence, what: str) -> None:
    if len(items) < 2:
        raise Unavailable(f"needs at least 2 {what}; got {len(items)}")


Generated = Sequence[tuple[Sample, Path]]  # the answered samples with their generated media file


def _fid(
    settings: MetricSettings,
    device: str,
    samples: Sequence[Sample],
    generated: Generated,
    per_sample: PerSample,
) -> Entry:
    model = load_fid_inception(settings.inception, device)
    reference = [s.media for s in samples if s.media is not None]
    _need([p for _, p in generated], "generated images")
    _need(reference, "reference images")
    size = settings.fid_image_size

    @torch.no_grad()
    def features(paths: Sequence[Path], desc: str) -> np.ndarray:
        out = []
        for chunk in tqdm(list(batches(list(paths), 16)), desc=desc, leave=False):
            x = to_tensor(
                [square_crop(read_image(p), size, resample=Image.Resampling.BILINEAR) for p in chunk]
            ).to(device)
            out.append(model(x).cpu().numpy())
        return np.concatenate(out)

    fid = frechet_distance_of(
        features([p for _, p in generated], "FID: generated"), features(reference, "FID: reference")
    )
    note = (
        "fewer than 2048 images per set: FID is biased upwards; compare only runs of equal size"
        if min(len(generated), len(reference)) < 2048
        else None
    )
    return value(
        fid,
        reference=len(reference),
        backbone="InceptionV3 pool3 (pytorch-fid weights)",
        **({"note": note} if note else {}),
    )


def _caption_similarity(
    metric: Literal["clip_score", "clap_score"],
    media_embeddings: np.ndarray,
    embedder: ClipEmbedder | ClapEmbedder,
    generated: Generated,
    per_sample: PerSample,
    backbone: str,
) -> Entry:
    """CLIP score / CLAP score: each generated item's embedding against its caption's, by the same
    joint embedder (``media_embeddings`` in ``generated``'s order)."""
    scores = clip_score(media_embeddings, embedder.texts([s.caption for s, _ in generated]))
    per_sample[metric] = {s.id: float(v) for (s, _), v in zip(generated, scores, strict=False)}
    return value(float(scores.mean()), backbone=backbone)


def _clip_score(
    settings: MetricSettings,
    device: str,
    samples: Sequence[Sample],
    generated: Generated,
    per_sample: PerSample,
) -> Entry:
    if not generated:
        raise Unavailable("no sample produced an image")
    clip = ClipEmbedder(settings.clip, device)
    return _caption_similarity(
        "clip_score",
        clip.images([read_image(p) for _, p in generated]),
        clip,
        generated,
        per_sample,
        str(settings.clip),
    )


def _clipsim(
    settings: MetricSettings,
    device: str,
    samples: Sequence[Sample],
    generated: Generated,
    per_sample: PerSample,
) -> Entry:
    if not generated:
        raise Unavailable("no sample produced a video")
    clip = ClipEmbedder(settings.clip, device)
    per_video: list[float] = []
    per_frame: dict[str, list[float]] = {}
    for s, p in tqdm(generated, desc="CLIPSIM", leave=False):
        frames = read_video_frames(p, settings.max_video_frames)
        text = clip.texts([s.caption])
        sims = clip_score(clip.images(frames), np.repeat(text, len(frames), axis=0))
        per_frame[s.id] = [round(float(v), 4) for v in sims]
        per_video.append(float(sims.mean()))
    per_sample["clipsim"] = {s.id: v for (s, _), v in zip(generated, per_video, strict=False)}
    per_sample["clipsim_frames"] = per_frame
    return value(
        float(np.mean(per_video)),
        backbone=str(settings.clip),
        frames_per_video=float(np.mean([len(v) for v in per_frame.values()])),
    )


def _audio_embedder(
    settings: MetricSettings, device: str
) -> tuple[str, Callable[[list[tuple[np.ndarray, int]]], np.ndarray]]:
    backbone = settings.fad_backbone
    if backbone == "vggish":
        model = load_vggish(settings.vggish, device)
        return "VGGish (128-d, per 0.96 s frame)", lambda waves: np.concatenate(
            [model.embed(w, r) for w, r in waves]
        )
    if backbone == "clap":
        clap = ClapEmbedder(settings.clap, device)
        return f"CLAP audio embedding ({settings.clap})", clap.audios
    raise Unavailable(f"metrics.fad_backbone={backbone!r}: must be vggish or clap")


def _fad(
    settings: MetricSettings,
    device: str,
    samples: Sequence[Sample],
    generated: Generated,
    per_sample: PerSample,
) -> Entry:
    reference = [s.media for s in samples if s.media is not None]
    _need(generated, "generated clips")
    _need(reference, "reference clips")
    backbone, embed = _audio_embedder(settings, device)
    gen = embed([read_wave(p) for _, p in tqdm(generated, desc="FAD: generated", leave=False)])
    ref = embed([read_wave(p) for p in tqdm(reference, desc="FAD: reference", leave=False)])
    return value(frechet_distance_of(gen, ref), reference=len(reference), backbone=backbone)


def _clap_score(
    settings: MetricSettings,
    device: str,
    samples: Sequence[Sample],
    generated: Generated,
    per_sample: PerSample,
) -> Entry:
    if not generated:
        raise Unavailable("no sample produced an audio clip")
    clap = ClapEmbedder(settings.clap, device)
    return _caption_similarity(
        "clap_score",
        clap.audios([read_wave(p) for _, p in generated]),
        clap,
        generated,
        per_sample,
        str(settings.clap),
    )


GENERATION_METRICS: dict[
    str, Callable[[MetricSettings, str, Sequence[Sample], Generated, PerSample], Entry]
] = {
    "fid": _fid,
    "clip_score": _clip_score,
    "clipsim": _clipsim,
    "fad": _fad,
    "clap_score": _clap_score,
}


# --- held-out losses of the benchmark's own captions (teacher-forced) --------------------------------
@torch.no_grad()
def _heldout(
    spec: EvalSpec, task: TaskSpec, generator: Generator, samples: Sequence[Sample], loss: str
) -> Entry:
    """``align_loss``: the model is shown "prompt -> answer with the signal group" for each caption
    and its projected group is compared with the decoder's text embedding of the caption (the
    stage-2/3 alignment loss). ``caption_ce``: cross-entropy of the reference caption given the media."""
    g = generator
    name = task.modality
    if loss == "align_loss" and task.kind != "generate":
        return value(unavailable="align_loss applies to text-to-X tasks")
    if loss == "caption_ce" and task.kind != "caption":
        return value(unavailable="caption_ce applies to X-to-text tasks")
    convs = []
    for s in samples:
        if task.kind == "generate":
            convs.append(
                Conversation(
                    s.id, [(task_prompt(task, s), str(task.answer))], captions_out=[(name, s.caption)]
                )
            )
        elif s.media is not None:
            prompt = with_placeholders(task.prompt, [s.media])
            convs.append(Conversation(s.id, [(prompt, s.caption)], media_in=[(name, str(s.media))]))
    total = count = 0.0
    for chunk in tqdm(list(batches(convs, spec.batch_size)), desc=f"{task.name}: {loss}", leave=False):
        dev = g.device
        batch = collate_conversations(
            chunk,
            g.tokenizer,
            g.model.layout,
            g.template.name,
            num_media_tokens=g.num_media_tokens,
            max_length=g.max_context,
            device=dev,
        )
        labels = batch["labels"]
        outs = g.model(**batch)
        if loss == "caption_ce":
            total += float(caption_loss_sum(outs.logits, labels))
            count += int((labels[:, 1:] != IGNORE_INDEX).sum())
        else:
            cond = outs.conditioning.get(name)
            if cond is None:
                continue
            target = g.conditioners[name].to(dev).encode([c.captions_out[0][1] for c in chunk])
            total += float(alignment_sum(cond, target))
            count += cond.shape[0]
    if not count:
        return value(unavailable="no sample to score")
    extra: dict[str, Any] = {"perplexity": math.exp(min(total / count, 50.0))} if loss == "caption_ce" else {}
    return value(total / count, samples=len(convs), **extra)
