"""Shared fixtures: where the real sample data lives, and skip markers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]

# Under pytest-xdist each worker takes its share of the cores, in torch and (through OMP_NUM_THREADS)
# in the processes it starts: two workers of two threads each on two cores spin against each other
# (benchmarks/worker_threads.py: a small training loop side by side took 40-160 s instead of 3-4 s).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
if _WORKERS > 1:
    _SHARE = max(1, (os.cpu_count() or 1) // _WORKERS)
    os.environ["OMP_NUM_THREADS"] = str(_SHARE)
    torch.set_num_threads(_SHARE)


def sample_data_dir() -> Path:
    """The real NExT-GPT sample folder: $NEXTGPT_SAMPLE_DATA, else ../shared/data/nextgpt_sample."""
    env = os.environ.get("NEXTGPT_SAMPLE_DATA")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "data" / "nextgpt_sample"


@pytest.fixture(scope="session", params=["given", "derived"])
def sample_root(request, tmp_path_factory) -> Path:
    """The real sample folder, and a second one of the same layout made from it with other file
    names and other counts (``derive_sample``): tests that read real data run on both, so none can
    lean on the names or sizes of one folder."""
    root = sample_data_dir()
    if not root.is_dir():
        pytest.skip(
            f"real sample data not found at {root} (set NEXTGPT_SAMPLE_DATA to a nextgpt_sample-layout folder)"
        )
    if request.param == "given":
        return root
    return derive_sample(root, tmp_path_factory.mktemp("derived_sample") / "nextgpt_sample")


def derive_sample(src: Path, dst: Path) -> Path:
    """A folder of ``src``'s layout with other names and counts: every third entry of each JSON
    file dropped, every media file renamed (and each JSON string naming it), and, beside it, one
    img2dataset-style shard of another name written from the derived cc3m pairs."""
    import io
    import json
    import shutil
    import tarfile

    for folder in sorted(p for p in src.iterdir() if p.is_dir()):
        out = dst / folder.name
        renamed: dict[str, str] = {}
        for f in sorted(folder.rglob("*")):
            if f.is_file() and f.suffix != ".json":
                new = f"v2-{f.stem[::-1]}{f.suffix}"
                renamed[f.name] = new
                target = out / f.relative_to(folder).with_name(new)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, target)

        def rename(value, renamed=renamed):
            if isinstance(value, str):
                if value in renamed:
                    return renamed[value]
                if value.endswith(".npy") and value[:-4] in renamed:
                    return renamed[value[:-4]] + ".npy"
                return value
            if isinstance(value, list):
                return [rename(v) for v in value]
            if isinstance(value, dict):
                return {k: rename(v) for k, v in value.items()}
            return value

        for f in sorted(folder.glob("*.json")):
            entries = json.loads(f.read_text(encoding="utf-8"))
            kept = (
                [rename(e) for i, e in enumerate(entries) if i % 3 != 1]
                if isinstance(entries, list)
                else rename(entries)
            )
            (out / f.name).write_text(json.dumps(kept, indent=1), encoding="utf-8")
    pairs = dst / "cc3m" / "cc3m.json"
    if pairs.is_file():
        shards = dst.parent / "img2dataset_cc3m"
        shards.mkdir(parents=True, exist_ok=True)
        written = 0
        with tarfile.open(shards / "part-a.tar", "w") as tar:
            for i, e in enumerate(json.loads(pairs.read_text(encoding="utf-8"))):
                image = dst / "cc3m" / "images" / e["image_name"]
                if not image.is_file():
                    continue
                key = f"{i:09d}"
                for ext, data in (
                    ("jpg", image.read_bytes()),
                    ("txt", e["caption"].encode()),
                    ("json", json.dumps({"key": key, "caption": e["caption"], "status": "success"}).encode()),
                ):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                written += 1
        (shards / "part-a_stats.json").write_text(json.dumps({"successes": written}))
    return dst


# Under pytest-xdist (`make test` runs `-n auto --dist loadgroup`), a test file's tests stay on one
# worker, so module fixtures (a trained demo bundle, tiny pipelines) are built once; the files
# below hold many independent runs and no costly module fixture, so their tests spread over the
# workers one by one (the longest file no longer runs alone at the end).
SPREAD_FILES = {
    "tests/integration/test_distributed.py",
    "tests/integration/test_runs.py",
    "tests/integration/test_shards_cli.py",
    "tests/integration/test_train_cli.py",
    "tests/unit/test_config.py",
    "tests/integration/test_trust.py",
    "tests/integration/test_bad_data_paths.py",
    "tests/integration/test_world_eval.py",
}
# files that share a costly session fixture run on one worker: the trained demo bundle
SHARED_GROUPS = {
    "tests/integration/test_web_demo.py": "demo_bundle",
    "tests/integration/test_serve.py": "demo_bundle",
}


def pytest_itemcollected(item):
    # as each test is collected, before any plugin's pytest_collection_modifyitems (pytest-xdist
    # reads the group in its own)
    path = item.nodeid.split("::", 1)[0]
    if path not in SPREAD_FILES and not item.get_closest_marker("xdist_group"):
        item.add_marker(pytest.mark.xdist_group(SHARED_GROUPS.get(path, path)))


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    # tests of a user interface over real media (marker one_sample_folder) run on the given sample
    # folder only: the derived folder proves the data readers, which other tests cover on both
    once = [
        it
        for it in items
        if "one_sample_folder" in it.keywords
        and getattr(it, "callspec", None) is not None
        and it.callspec.params.get("sample_root") == "derived"
    ]
    if once:
        config.hook.pytest_deselected(items=once)
        items[:] = [it for it in items if it not in once]
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


# --- tiny models and synthetic data, built once per machine (idempotent) ------------------
CACHE_DIR = Path(os.environ.get("NEXTGPT_CACHE", REPO_ROOT / ".cache"))


@pytest.fixture(scope="session")
def tiny_cache() -> Path:
    """Tiny backbones and the synthetic data set under the project cache (built once)."""
    from nextgpt.tiny import build_all
    from nextgpt.world.synthetic import write_synthetic

    build_all(CACHE_DIR / "tiny_backbones")
    write_synthetic(CACHE_DIR / "synthetic", num_per_modality=24, seed=0)
    return CACHE_DIR


@pytest.fixture(scope="session")
def world_small(tiny_cache) -> Path:
    """The small world build (``python -m nextgpt.world.build --small``, about 90 s), built once per
    machine under the project cache; concurrent workers wait on its lock."""
    from nextgpt.world.build import build_world

    return build_world(CACHE_DIR / "world_small", tiny_cache / "tiny_backbones", small=True)


@pytest.fixture
def tiny_config(tiny_cache, tmp_path):
    """Compose a config on the tiny model with every output under tmp_path."""
    from nextgpt.config import compose

    def make(*overrides: str):
        return compose(
            [f"paths.root={tmp_path}", f"paths.cache_dir={tiny_cache}", "logger=csv", *overrides],
            output_dir=str(tmp_path / "run"),
        )

    return make


# --- the README's demo bundle, trained once per session by the tests that serve it ------------
DEMO_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "WANDB_MODE": "offline",
    "WANDB_SILENT": "true",
}


@pytest.fixture(scope="session")  # session: trained once, whichever sample folder the tests run on
def demo_bundle(tiny_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny three-stage demo (experiment=tiny_demo), trained into tmp (about 1.5 min on 2 idle cores).
    $NEXTGPT_DEMO_BUNDLE names an already trained stage-3 bundle to use instead (for quick reruns)."""
    import subprocess
    import sys

    if os.environ.get("NEXTGPT_DEMO_BUNDLE"):
        return Path(os.environ["NEXTGPT_DEMO_BUNDLE"])
    root = tmp_path_factory.mktemp("demo_train")
    cmd = [
        sys.executable,
        "train.py",
        "-m",
        "stage=1,2,3",
        "experiment=tiny_demo",
        f"paths.root={root}",
        f"paths.cache_dir={tiny_cache}",
        "logger=csv",
        "print_config=false",
    ]  # csv: no W&B start-up per stage
    proc = subprocess.run(
        cmd,
        cwd=REPO_ROOT,
        env={**os.environ, **DEMO_ENV},
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    bundle = root / "bundles" / "stage3"
    assert proc.returncode == 0 and (bundle / "trainable.safetensors").is_file(), (
        f"training the demo bundle failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    return bundle


@pytest.fixture(scope="session")
def generator(demo_bundle: Path):
    """The demo bundle loaded in this process: what a served answer must equal."""
    from nextgpt.generate import Generator

    return Generator(demo_bundle, device="cpu")
