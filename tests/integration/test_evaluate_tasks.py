"""The six benchmark tasks end to end on tiny fabricated benchmarks in their real annotation formats,
with the tiny stage-3 bundle and tiny feature networks; readers; resuming; scoring given outputs."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from omegaconf import OmegaConf
from PIL import Image

from nextgpt.evaluation.readers import BenchmarkError, read_benchmark
from tests.cli import run_python
from tests.conftest import REPO_ROOT

TASKS = ("t2i_coco", "t2a_audiocaps", "t2v_msrvtt", "i2t_coco", "a2t_audiocaps", "v2t_msrvtt")
needs_java = pytest.mark.skipif(
    shutil.which("java") is None, reason="java not on PATH (apt-get install default-jre-headless)"
)


# =====================================================================================================
# fabricated benchmarks, each in its official annotation format
# =====================================================================================================
def synthetic_items(cache: Path, name: str, n: int) -> list[tuple[Path, str]]:
    from nextgpt import modality

    mod = modality.get(name)
    folder = cache / "synthetic" / f"synthetic_{name}"
    entries = json.loads((folder / f"synthetic_{name}.json").read_text())[:n]
    return [(folder / mod.media_folder / e[mod.name_field], e["caption"]) for e in entries]


COCO_IDS = (42, 73, 74, 133)


def write_coco(root: Path, cache: Path, n: int = 4) -> Path:
    """annotations/captions_val2014.json + val2014/COCO_val2014_<12-digit id>.jpg, two captions per image."""
    (root / "annotations").mkdir(parents=True)
    (root / "val2014").mkdir()
    images, annotations = [], []
    for k, (image_id, (src, caption)) in enumerate(
        zip(COCO_IDS, synthetic_items(cache, "image", n), strict=False)
    ):
        name = f"COCO_val2014_{image_id:012d}.jpg"
        Image.open(src).convert("RGB").save(root / "val2014" / name, quality=95)
        images.append(
            {
                "license": 1,
                "file_name": name,
                "coco_url": "",
                "height": 64,
                "width": 64,
                "date_captured": "2013-11-14 16:28:13",
                "flickr_url": "",
                "id": image_id,
            }
        )
        for j, cap in enumerate((caption.capitalize() + ".", f"A picture of {caption}")):
            annotations.append({"image_id": image_id, "id": 1000 * k + j, "caption": cap})
    data = {
        "info": {"description": "COCO 2014 Dataset"},
        "images": images,
        "licenses": [],
        "type": "captions",
        "annotations": annotations,
    }
    (root / "annotations" / "captions_val2014.json").write_text(json.dumps(data))
    return root


YOUTUBE_IDS = ("--0w1YA1Hm4", "-AheI8Epim4", "0BtZ1BJs8u8", "1Dh3VJBjXqM")


def write_audiocaps(root: Path, cache: Path, n: int = 3) -> Path:
    """test.csv (audiocap_id,youtube_id,start_time,caption; several rows per clip) + audio/test/<youtube_id>.wav."""
    (root / "audio" / "test").mkdir(parents=True)
    rows = []
    for k, (yid, (src, caption)) in enumerate(
        zip(YOUTUBE_IDS, synthetic_items(cache, "audio", n), strict=False)
    ):
        wave, rate = sf.read(src)
        sf.write(root / "audio" / "test" / f"{yid}.wav", wave, rate)
        rows += [(97151 + 10 * k, yid, 30, caption), (97152 + 10 * k, yid, 30, f"someone plays {caption}")]
    with (root / "test.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["audiocap_id", "youtube_id", "start_time", "caption"])
        w.writerows(rows)
    return root


def write_msrvtt(root: Path, cache: Path, n: int = 3) -> Path:
    """test_videodatainfo.json ({"videos": [...], "sentences": [...]}) + TestVideo/video<id>.mp4."""
    (root / "TestVideo").mkdir(parents=True)
    videos, sentences = [], []
    for k, (src, caption) in enumerate(synthetic_items(cache, "video", n)):
        vid = f"video{7010 + k}"
        shutil.copy(src, root / "TestVideo" / f"{vid}.mp4")
        videos.append(
            {
                "category": 9,
                "url": "https://www.youtube.com/watch?v=x",
                "video_id": vid,
                "start time": 1.0,
                "end time": 11.0,
                "split": "test",
                "id": 7010 + k,
            }
        )
        for j, cap in enumerate((caption, f"a video of {caption}")):
            sentences.append({"caption": cap, "video_id": vid, "sen_id": 180000 + 10 * k + j})
    (root / "test_videodatainfo.json").write_text(
        json.dumps({"info": {"year": 2016}, "videos": videos, "sentences": sentences})
    )
    return root


@pytest.fixture(scope="module")
def data_root(tiny_cache, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("benchmarks")
    write_coco(root / "coco", tiny_cache)
    write_audiocaps(root / "audiocaps", tiny_cache)
    write_msrvtt(root / "msrvtt", tiny_cache)
    return root


@pytest.fixture(scope="module")
def feature_nets(tmp_path_factory) -> dict[str, Path]:
    from nextgpt.metrics.tiny import build_random_inception, build_tiny_clap, build_tiny_clip

    root = tmp_path_factory.mktemp("feature_nets")
    return {
        "clip": build_tiny_clip(root / "clip"),
        "clap": build_tiny_clap(root / "clap"),
        "inception": build_random_inception(root / "pt_inception-2015-12-05-6726825d.pth"),
    }


# =====================================================================================================
# readers
# =====================================================================================================
def test_coco_reader_official_and_karpathy(tiny_cache, tmp_path):
    write_coco(tmp_path / "coco", tiny_cache)
    samples = read_benchmark("coco", tmp_path / "coco")
    assert [s.id for s in samples] == [str(i) for i in COCO_IDS]
    assert all(s.modality == "image" and s.media.is_file() and len(s.captions) == 2 for s in samples)
    karpathy = {
        "images": [
            {
                "filepath": "val2014",
                "filename": f"COCO_val2014_{i:012d}.jpg",
                "cocoid": i,
                "split": split,
                "sentences": [
                    {"raw": "A dog.", "tokens": ["a", "dog"]},
                    {"raw": "A cat.", "tokens": ["a", "cat"]},
                ],
            }
            for i, split in zip(COCO_IDS, ("test", "val", "test", "train"), strict=False)
        ],
        "dataset": "coco",
    }
    (tmp_path / "coco" / "dataset_coco.json").write_text(json.dumps(karpathy))
    test = read_benchmark("coco", tmp_path / "coco", annotations="dataset_coco.json", split="test")
    assert (
        [s.id for s in test] == ["42", "74"]
        and test[0].media.is_file()
        and test[0].captions == ["A dog.", "A cat."]
    )
    with pytest.raises(BenchmarkError, match="captions_test2014.json"):
        read_benchmark("coco", tmp_path / "coco", annotations="annotations/captions_test2014.json")


def test_audiocaps_reader_groups_captions_per_clip(tiny_cache, tmp_path):
    root = write_audiocaps(tmp_path / "ac", tiny_cache)
    (root / "audio" / "test" / f"{YOUTUBE_IDS[1]}.wav").rename(
        root / "audio" / "test" / f"Y{YOUTUBE_IDS[1]}.wav"
    )
    (root / "audio" / "test" / f"{YOUTUBE_IDS[2]}.wav").unlink()
    samples = read_benchmark("audiocaps", root)
    assert [s.id for s in samples] == list(YOUTUBE_IDS[:3])
    assert all(len(s.captions) == 2 for s in samples) and samples[0].captions[1].startswith("someone plays")
    assert (
        samples[1].media.name == f"Y{YOUTUBE_IDS[1]}.wav" and samples[2].media is None
    )  # missing clip: no media
    (root / "bad.csv").write_text("youtube_id,caption\nx,y\n")
    with pytest.raises(BenchmarkError, match="audiocap_id"):
        read_benchmark("audiocaps", root, annotations="bad.csv")


def test_msrvtt_reader_both_annotation_files(tiny_cache, tmp_path):
    root = write_msrvtt(tmp_path / "msrvtt", tiny_cache)
    samples = read_benchmark("msrvtt", root)
    assert [s.id for s in samples] == ["video7010", "video7011", "video7012"] and samples[
        0
    ].media.suffix == ".mp4"
    data = json.loads((root / "test_videodatainfo.json").read_text())
    data["videos"][1]["split"] = "train"  # MSRVTT_data.json: every split in one file
    (root / "MSRVTT_data.json").write_text(json.dumps(data))
    test = read_benchmark("msrvtt", root, annotations="MSRVTT_data.json", split="test")
    assert [s.id for s in test] == ["video7010", "video7012"]
    with pytest.raises(BenchmarkError, match="not found"):
        read_benchmark("msrvtt", tmp_path / "nowhere")


@pytest.mark.parametrize("task", ("heldout_loss", *TASKS))
def test_every_task_config_composes(task, tmp_path):
    from nextgpt.config import compose

    cfg = compose(
        [f"task={task}", f"paths.root={tmp_path}"], config_name="evaluate", output_dir=str(tmp_path)
    )
    assert cfg.task.name == task
    if task != "heldout_loss":
        resolved = OmegaConf.to_container(cfg.task, resolve=True)
        assert resolved["kind"] in ("caption", "generate") and resolved["metrics"]
        assert resolved["benchmark"]["root"].startswith(str(tmp_path))
        assert set(resolved["paper"]) <= set(resolved["metrics"])


# =====================================================================================================
# the model: a tiny stage-3 bundle, and copies steered to answer with one modality
# =====================================================================================================
@pytest.fixture(scope="module")
def bundle(tiny_cache, tmp_path_factory) -> Path:
    from nextgpt.bundles import save_bundle
    from nextgpt.config import compose
    from nextgpt.stages import Stage3InstructionTuning

    root = tmp_path_factory.mktemp("eval_bundle")
    cfg = compose([f"paths.root={root}", f"paths.cache_dir={tiny_cache}", "stage=3"], output_dir=str(root))
    resolved = OmegaConf.to_container(cfg, resolve=True)
    module = Stage3InstructionTuning(
        model=resolved["model"], optim=resolved["stage"]["optim"], loss=resolved["stage"]["loss"]
    )
    module.configure_model()
    return save_bundle(root / "stage3", module.model, resolved, {"stage": 3})


def steered_bundle(bundle: Path, dst: Path, modality: str, prompt: str) -> Path:
    """A copy of ``bundle`` whose first ``modality`` signal token is the first choice after
    ``prompt`` (and after prompts like it): a stand-in for a model trained to answer with it."""
    from safetensors.torch import load_file, save_file

    from nextgpt.generate import Generator
    from nextgpt.prompts import Conversation, encode_conversation

    g = Generator(bundle)
    enc = encode_conversation(
        Conversation("p", [(prompt, "")]),
        g.tokenizer,
        g.model.layout,
        g.template,
        num_media_tokens=1,
        max_length=10**6,
        slot_id=0,
    )
    with torch.no_grad():
        h = g.model(torch.tensor([enc.input_ids])).hidden[0, -1]
    table = g.model.new_tokens
    row = g.model.layout.signal_ids[modality][0] - table.first_new_id - table.markers.head.shape[0]
    shutil.copytree(bundle, dst)
    state = load_file(str(dst / "trainable.safetensors"))
    state["new_tokens.signals.head"][row] = 1e3 * h / h.norm() ** 2
    save_file(state, str(dst / "trainable.safetensors"))
    return dst


def signal_count(modality: str) -> int:
    from nextgpt import modality as registry

    return registry.get(modality).default_num_signal_tokens


def run_task(
    task: str,
    run_dir: Path,
    data_root: Path,
    nets: dict,
    *extra: str,
    checkpoint: Path | None = None,
    cache: Path | None = None,
) -> dict:
    from nextgpt.cli.evaluate import evaluate
    from nextgpt.config import compose

    overrides = [
        f"task={task}",
        f"paths.root={run_dir.parent}",
        f"paths.data_root={data_root}",
        "batch_size=2",
        *(f"feature_nets.{k}={v}" for k, v in nets.items()),
        *extra,
    ]
    if checkpoint is not None:
        overrides.append(f"checkpoint={checkpoint}")
    if cache is not None:
        overrides.append(f"paths.cache_dir={cache}")
    cfg = compose(overrides, config_name="evaluate", output_dir=str(run_dir))
    return evaluate(cfg)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# =====================================================================================================
# batched generation = one chat call per request
# =====================================================================================================
@pytest.mark.slow
def test_batched_generation_matches_chat(bundle, tiny_cache, tmp_path):
    from nextgpt.evaluation.batched import BatchedGenerator, Request
    from nextgpt.generate import Generator

    prompt = "Please make an image of a red circle at the top left on a black background"
    g = Generator(steered_bundle(bundle, tmp_path / "steered", "image", prompt))
    image = synthetic_items(tiny_cache, "image", 1)[0][0]
    requests = [
        Request(prompt, seed=5),
        Request("Describe this image briefly.", [image], seed=1),
        Request("hello, who are you and what can you do for me today?", seed=2),
    ]
    n = signal_count("image")
    batched = BatchedGenerator(g).generate(
        requests, max_new_tokens=n + 2, out_path=lambda i, m, k: tmp_path / f"b{i}_{k}.png"
    )
    for req, got in zip(requests, batched, strict=False):
        want = g.chat(req.prompt, req.media, max_new_tokens=n + 2, seed=req.seed, out_dir=tmp_path / "chat")
        assert (got.text, got.signal_groups, got.new_tokens) == (
            want.text,
            want.signal_groups,
            want.new_tokens,
        )
        for name in want.arrays:
            for a, b in zip(got.arrays[name], want.arrays[name], strict=False):
                np.testing.assert_allclose(a, b, atol=1e-4)
    assert (
        batched[0].signal_groups
        and batched[0].signal_groups[0] == "image"
        and batched[0].files["image"][0].is_file()
    )


# =====================================================================================================
# each task end to end
# =====================================================================================================
GENERATION_PROMPT = {"t2i_coco": "image", "t2a_audiocaps": "audio", "t2v_msrvtt": "video"}


@pytest.mark.slow
@pytest.mark.parametrize("task", TASKS)
def test_task_end_to_end(task, bundle, data_root, feature_nets, tiny_cache, tmp_path):
    from nextgpt.config import compose
    from nextgpt.evaluation.readers import read_benchmark as read
    from nextgpt.evaluation.records import task_prompt
    from nextgpt.evaluation.spec import eval_spec

    cfg = compose(
        [f"task={task}", f"paths.data_root={data_root}"], config_name="evaluate", output_dir=str(tmp_path)
    )
    samples = read(cfg.task.benchmark.reader, cfg.task.benchmark.root, **cfg.task.benchmark.options)
    extra = []
    checkpoint = bundle
    if task in GENERATION_PROMPT:
        name = GENERATION_PROMPT[task]
        first_prompt = task_prompt(eval_spec(cfg).benchmark_task(), samples[0])
        checkpoint = steered_bundle(bundle, tmp_path / "steered", name, first_prompt)
        extra = [f"task.generation.max_new_tokens={signal_count(name)}"]
        if task == "t2a_audiocaps":
            extra.append("metrics.fad_backbone=clap")  # VGGish is exercised in the unit tests
    else:
        extra = ["task.generation.max_new_tokens=6"]
    run = tmp_path / "run"
    run_task(task, run, data_root, feature_nets, *extra, checkpoint=checkpoint, cache=tiny_cache)

    records = read_jsonl(run / "samples.jsonl")
    assert sorted(r["id"] for r in records) == sorted(s.id for s in samples) and not any(
        r.get("error") for r in records
    )
    saved = json.loads((run / "results.json").read_text())
    assert saved["task"] == task and saved["samples"] == len(samples) == saved["answered"]
    m = saved["metrics"]
    assert list(m) == list(cfg.task.metrics)
    md = (run / "results.md").read_text()
    assert "| metric | ours | NExT-GPT (paper) |" in md
    for ref in cfg.task.paper.values():
        assert f"{ref.nextgpt:g}" in md
    if task in GENERATION_PROMPT:
        name = GENERATION_PROMPT[task]
        assert m["trigger_rate"]["value"] == pytest.approx(1.0), (
            records
        )  # the steered bundle asks for `name` each time
        assert all(r["signal_groups"] == [name] and (run / r["files"][name][0]).is_file() for r in records)
        assert m["align_loss"]["value"] > 0
        for metric in set(m) - {"trigger_rate", "align_loss"}:
            assert m[metric]["value"] is not None and np.isfinite(m[metric]["value"]), m[metric]
            assert m[metric]["generated"] == len(samples)
        if task == "t2i_coco":
            assert m["fid"]["value"] > 0 and m["fid"]["reference"] == len(samples) and "FID ↓" in md
            assert 0 <= m["clip_score"]["value"] <= 100
        if task == "t2v_msrvtt":
            assert 0 <= m["clipsim"]["value"] <= 100 and m["clipsim"]["frames_per_video"] > 1
            per = json.loads((run / "per_sample.json").read_text())
            assert set(per["clipsim_frames"]) == {s.id for s in samples}
    else:
        for metric in ("bleu4", "meteor", "cider"):
            if metric in m:
                if shutil.which("java"):
                    assert m[metric]["value"] is not None and m[metric]["value"] >= 0, m[metric]
                else:
                    assert "java not found" in m[metric]["unavailable"]
        assert m["caption_ce"]["value"] > 0 and 0 <= m["trigger_rate"]["value"] <= 1
        if (
            task == "a2t_audiocaps" and m["spice"]["value"] is None
        ):  # SPICE needs CoreNLP models: not downloadable here
            assert (
                "stanford-corenlp-3.6.0" in m["spice"]["unavailable"] or "java" in m["spice"]["unavailable"]
            )
            assert m["spider"]["value"] is None and "SPICE" in m["spider"]["unavailable"]
            assert "unavailable" in md
        assert all(isinstance(r["caption"], str) and "<" not in r["caption"] for r in records)


# =====================================================================================================
# resuming
# =====================================================================================================
@pytest.mark.slow
def test_a_stopped_run_continues_where_it_stopped(bundle, data_root, feature_nets, tiny_cache, tmp_path):
    from nextgpt.config import ConfigError

    run = tmp_path / "run"
    common = ("task.generation.max_new_tokens=4", "task.metrics=[trigger_rate]")
    run_task(
        "i2t_coco", run, data_root, feature_nets, "limit=2", *common, checkpoint=bundle, cache=tiny_cache
    )
    first = read_jsonl(run / "samples.jsonl")
    assert [r["id"] for r in first] == ["42", "73"]
    with (run / "samples.jsonl").open("a") as f:
        f.write('{"id": "74", "prompt": "cut sh')  # the process died while writing sample 74
    result = run_task("i2t_coco", run, data_root, feature_nets, *common, checkpoint=bundle, cache=tiny_cache)
    records = read_jsonl(run / "samples.jsonl")
    assert records[:2] == first  # not redone
    assert [r["id"] for r in records] == ["42", "73", "74", "133"] and result["answered"] == 4
    with pytest.raises(ConfigError, match="prompt"):  # other settings never mix into this folder
        run_task(
            "i2t_coco",
            run,
            data_root,
            feature_nets,
            *common,
            "task.prompt=Say something.",
            checkpoint=bundle,
            cache=tiny_cache,
        )


# =====================================================================================================
# scoring given outputs
# =====================================================================================================
@needs_java
@pytest.mark.slow
def test_caption_scores_of_a_predictions_file_equal_pycocoevalcap(
    data_root, feature_nets, tmp_path, monkeypatch
):
    """predictions= in the COCO results format, scored without a model, equals pycocoevalcap's own
    COCOEvalCap on the same two files (to 4 decimals)."""
    from pycocoevalcap import eval as coco_eval
    from pycocotools.coco import COCO

    refs = {}
    for a in json.loads((data_root / "coco" / "annotations" / "captions_val2014.json").read_text())[
        "annotations"
    ]:
        refs.setdefault(a["image_id"], []).append(a["caption"])
    preds = [
        {"image_id": 42, "caption": refs[42][0]},  # exact, partial, shuffled, unrelated
        {"image_id": 73, "caption": " ".join(refs[73][1].split()[:6])},
        {"image_id": 74, "caption": " ".join(reversed(refs[74][0].split())) + " ."},
        {"image_id": 133, "caption": "Two dogs, playing!"},
    ]
    pred_file = tmp_path / "captions_val2014_nextgpt_results.json"
    pred_file.write_text(json.dumps(preds))
    result = run_task(
        "i2t_coco",
        tmp_path / "run",
        data_root,
        feature_nets,
        f"predictions={pred_file}",
        "task.metrics=[bleu1,bleu4,meteor,rouge_l,cider,trigger_rate,caption_ce]",
        checkpoint=tmp_path / "no_bundle_needed",
    )
    ours = {k: v["value"] for k, v in result["metrics"].items()}

    class NoSpice:  # SPICE's first use downloads CoreNLP: out of reach here, and not compared
        def compute_score(self, gts, res):
            return 0.0, [0.0] * len(gts)

        def method(self):
            return "SPICE"

    monkeypatch.setattr(coco_eval, "Spice", NoSpice)
    coco = COCO(str(data_root / "coco" / "annotations" / "captions_val2014.json"))
    evaluator = coco_eval.COCOEvalCap(coco, coco.loadRes(str(pred_file)))
    evaluator.params["image_id"] = coco.loadRes(str(pred_file)).getImgIds()
    evaluator.evaluate()
    theirs = evaluator.eval
    for ours_name, their_name in (
        ("bleu1", "Bleu_1"),
        ("bleu4", "Bleu_4"),
        ("meteor", "METEOR"),
        ("rouge_l", "ROUGE_L"),
        ("cider", "CIDEr"),
    ):
        assert round(ours[ours_name], 4) == round(theirs[their_name], 4), (
            ours_name,
            ours[ours_name],
            theirs[their_name],
        )
    assert ours["cider"] > 0
    for needs_model in ("trigger_rate", "caption_ce"):
        assert "predictions=" in result["metrics"][needs_model]["unavailable"]


@pytest.mark.slow
def test_a_media_folder_is_scored_without_a_model(data_root, feature_nets, tmp_path):
    """Generated clips named by AudioCaps YouTube id; the CLAP score is computed, FAD with the default
    VGGish backbone is unavailable (no weights at the configured path) with the reason, never a number."""
    folder = tmp_path / "other_system"
    folder.mkdir()
    rate = 16000
    for k, yid in enumerate(YOUTUBE_IDS[:3]):
        t = np.arange(rate) / rate
        sf.write(folder / f"{yid}.wav", 0.2 * np.sin(2 * np.pi * (300 + 200 * k) * t), rate)
    run = tmp_path / "run"
    nets = {**feature_nets, "vggish": tmp_path / "weights" / "vggish-10086976.pth"}
    result = run_task(
        "t2a_audiocaps", run, data_root, nets, f"predictions={folder}", checkpoint=tmp_path / "none"
    )
    m = result["metrics"]
    assert m["fad"]["value"] is None and "vggish-10086976.pth" in m["fad"]["unavailable"]
    assert 0 <= m["clap_score"]["value"] <= 100 and m["clap_score"]["generated"] == 3
    assert m["trigger_rate"]["value"] is None and m["align_loss"]["value"] is None
    md = (run / "results.md").read_text()
    assert "| FAD ↓ | unavailable | 1.68 |" in md and "vggish-10086976.pth" in md
    # the same clips with the CLAP backbone: a number
    result = run_task(
        "t2a_audiocaps",
        tmp_path / "run2",
        data_root,
        feature_nets,
        f"predictions={folder}",
        "metrics.fad_backbone=clap",
        checkpoint=tmp_path / "none",
    )
    assert result["metrics"]["fad"]["value"] >= 0 and "CLAP" in result["metrics"]["fad"]["backbone"]


# =====================================================================================================
# the literal command line, with a W&B table
# =====================================================================================================
@pytest.mark.slow
def test_cli_writes_results_and_a_wandb_table(bundle, data_root, feature_nets, tiny_cache, tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    env.pop("WANDB_API_KEY", None)
    args = [
        sys.executable,
        "evaluate.py",
        "task=v2t_msrvtt",
        f"checkpoint={bundle}",
        f"paths.data_root={data_root}",
        f"paths.root={tmp_path}",
        f"paths.cache_dir={tiny_cache}",
        "limit=2",
        "batch_size=2",
        "task.generation.max_new_tokens=4",
        "task.metrics=[bleu4,cider,trigger_rate]",
        "logger=wandb",
        f"hydra.run.dir={run}",
    ]
    # a subprocess: this test proves the command line itself
    res = subprocess.run(
        args, check=False, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, env=env
    )
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads((run / "results.json").read_text())
    assert result["samples"] == 2 and set(result["metrics"]) == {"bleu4", "cider", "trigger_rate"}
    assert (run / "results.md").is_file() and len(read_jsonl(run / "samples.jsonl")) == 2
    runs = list((run / "wandb").glob("offline-run-*"))
    assert runs and any(p.suffix == ".wandb" for p in runs[0].iterdir())
    assert "v2t_msrvtt: answering" in res.stderr  # the progress bar


# =====================================================================================================
# given outputs that can not be scored are refused, naming the file and the ids at fault
# =====================================================================================================
@pytest.mark.parametrize(
    "case,preds,extra,needles",
    [
        (
            "duplicate",
            [
                {"image_id": 42, "caption": "a first"},
                {"image_id": 42, "caption": "a second"},
                {"image_id": 73, "caption": "x"},
            ],
            [],
            ["more than once", "'42'", "(1 in all)"],
        ),
        (
            "unknown",
            [
                {"image_id": 42, "caption": "a dog"},
                {"image_id": 999, "caption": "ghost"},
                {"image_id": 1000, "caption": "ghost"},
            ],
            [],
            ["not in the benchmark", "'999', '1000'", "(2 in all)"],
        ),
        (
            "not_text",
            [
                {"image_id": 42, "caption": None},
                {"image_id": 73, "caption": 7},
                {"image_id": 74, "caption": "ok"},
            ],
            [],
            ["not a string", "'42': null", "'73': 7", "(2 in all)"],
        ),
        ("no_match", [{"image_id": 1, "caption": "a"}, {"image_id": 2, "caption": "b"}], [], ["'1', '2'"]),
        (
            "beyond_limit",
            [{"image_id": 133, "caption": "a"}],
            ["limit=2"],
            ["none of the samples scored", "'42', '73'"],
        ),
    ],
    ids=("duplicate", "unknown", "not_text", "no_match", "beyond_limit"),
)
def test_a_predictions_file_that_can_not_be_scored_exits_2(case, preds, extra, needles, data_root, tmp_path):
    pred_file = tmp_path / f"{case}.json"
    pred_file.write_text(json.dumps(preds))
    run = tmp_path / "run"
    res = run_python(
        [
            sys.executable,
            "evaluate.py",
            "task=i2t_coco",
            f"predictions={pred_file}",
            *extra,
            f"paths.data_root={data_root}",
            f"paths.root={tmp_path}",
            f"hydra.run.dir={run}",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"},
    )
    assert res.returncode == 2, res.stderr[-3000:]
    assert "Traceback" not in res.stderr and f"predictions={str(pred_file)!r}" in res.stderr
    assert all(n in res.stderr for n in needles), (needles, res.stderr[-2000:])
    assert not (run / "samples.jsonl").exists() and not (run / "results.json").exists()


def test_a_media_folder_matching_no_sample_is_refused(data_root, tmp_path):
    from nextgpt.config import ConfigError

    folder = tmp_path / "other_system"
    folder.mkdir()
    sf.write(folder / "not_a_youtube_id.wav", np.zeros(1600), 16000)
    with pytest.raises(ConfigError, match=r"other_system.*no file named <sample id>\{\.wav.*--0w1YA1Hm4"):
        run_task("t2a_audiocaps", tmp_path / "run", data_root, {}, f"predictions={folder}")
    assert not (tmp_path / "run" / "results.json").exists()
