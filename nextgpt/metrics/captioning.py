"""Captioning metrics through pycocoevalcap, the reference implementation of the COCO caption
evaluation: PTB tokenisation (Stanford CoreNLP 3.4.1, as pycocoevalcap ships it), then BLEU-1..4,
METEOR 1.5, ROUGE-L, CIDEr-D and, where Stanford CoreNLP 3.6.0 is on disk, SPICE and SPIDEr.

The tokeniser runs the same jar with the same flags and punctuation filter as pycocoevalcap's
``PTBTokenizer``, but writes its input to a temporary folder rather than into the installed
package (which may be read-only). Everything that needs Java is reported unavailable with the
reason when ``java`` is not on the PATH; nothing falls back to another tokeniser.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from nextgpt.metrics import Unavailable

log = logging.getLogger(__name__)

# pycocoevalcap's punctuation filter after PTB tokenisation
PUNCTUATIONS = {
    "''",
    "'",
    "``",
    "`",
    "-LRB-",
    "-RRB-",
    "-LCB-",
    "-RCB-",
    ".",
    "?",
    "!",
    ",",
    ":",
    "-",
    "--",
    "...",
    ";",
}
CORENLP_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")
# metric name in results -> pycocoevalcap's name
COCO_NAMES = {
    "bleu1": "Bleu_1",
    "bleu2": "Bleu_2",
    "bleu3": "Bleu_3",
    "bleu4": "Bleu_4",
    "meteor": "METEOR",
    "rouge_l": "ROUGE_L",
    "cider": "CIDEr",
    "spice": "SPICE",
    "spider": "SPIDEr",
}
METRICS = tuple(COCO_NAMES)


def _package_dir() -> Path:
    try:
        import pycocoevalcap  # deferred: optional (Unavailable without it); only caption scores need it
    except ImportError as e:
        raise Unavailable("pycocoevalcap is not installed (pip install pycocoevalcap)") from e
    return Path(next(iter(pycocoevalcap.__path__))).resolve()  # a namespace package: no __file__


def java_unavailable_reason() -> str | None:
    """None when a working ``java`` is on the PATH, else why not."""
    java = shutil.which("java")
    if java is None:
        return (
            "java not found on PATH: PTB tokenisation, METEOR and SPICE run Java programs "
            "(install a runtime, e.g. apt-get install default-jre-headless)"
        )
    try:
        subprocess.run([java, "-version"], capture_output=True, check=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        return f"{java} -version failed: {e}"
    return None


def _require_java() -> None:
    reason = java_unavailable_reason()
    if reason:
        raise Unavailable(reason)


def ptb_tokenize(captions: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    """PTB-tokenise, lower-case and strip punctuation, exactly as pycocoevalcap does."""
    _require_java()
    jar = _package_dir() / "tokenizer" / "stanford-corenlp-3.4.1.jar"
    keys = [k for k, caps in captions.items() for _ in caps]
    sentences = [c.replace("\n", " ") for caps in captions.values() for c in caps]
    with tempfile.TemporaryDirectory(prefix="ptb") as tmp:
        src = Path(tmp) / "captions.txt"
        src.write_bytes("\n".join(sentences).encode())
        cmd = [
            "java",
            "-cp",
            str(jar),
            "edu.stanford.nlp.process.PTBTokenizer",
            "-preserveLines",
            "-lowerCase",
            str(src),
        ]
        res = subprocess.run(cmd, capture_output=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(
            f"PTB tokenizer failed ({res.returncode}): {res.stderr.decode(errors='replace')[-2000:]}"
        )
    lines = res.stdout.decode().split("\n")
    lines += [""] * (len(keys) - len(lines))  # trailing empty captions
    out: dict[str, list[str]] = {k: [] for k in captions}
    for k, line in zip(keys, lines, strict=False):
        out[k].append(" ".join(w for w in line.rstrip().split(" ") if w not in PUNCTUATIONS))
    return out


def spice_jars(corenlp_dir: str | Path | None = None) -> list[Path]:
    """The class path of SPICE: its jar, its bundled libraries and Stanford CoreNLP 3.6.0."""
    spice_dir = _package_dir() / "spice"
    places = [Path(corenlp_dir)] if corenlp_dir else []
    places.append(spice_dir / "lib")
    corenlp = []
    for name in CORENLP_JARS:
        found = next((p / name for p in places if (p / name).is_file()), None)
        if found is None:
            where = " or ".join(str(p) for p in places)
            raise Unavailable(
                f"SPICE needs Stanford CoreNLP 3.6.0 ({' and '.join(CORENLP_JARS)}), which pycocoevalcap downloads "
                f"from the internet on first use; {name} is not in {where}. Put both jars in a folder and pass "
                "metrics.spice_corenlp=DIR (from stanford-corenlp-full-2015-12-09.zip)"
            )
        corenlp.append(found)
    libs = sorted(p for p in (spice_dir / "lib").glob("*.jar") if p.name not in CORENLP_JARS)
    return [spice_dir / "spice-1.0.jar", *corenlp, *libs]


def spice_score(
    gts: Mapping[str, list[str]],
    res: Mapping[str, list[str]],
    corenlp_dir: str | Path | None = None,
    memory: str = "8G",
) -> tuple[float, list[float]]:
    """SPICE F-score (the mean over items, as pycocoevalcap reports it) and the per-item scores."""
    _require_java()
    classpath = os.pathsep.join(str(p) for p in spice_jars(corenlp_dir))
    ids = sorted(gts)
    items = [{"image_id": i, "test": res[i][0], "refs": list(gts[i])} for i in ids]
    with tempfile.TemporaryDirectory(prefix="spice") as tmp:
        src, dst = Path(tmp) / "in.json", Path(tmp) / "out.json"
        src.write_text(json.dumps(items))
        cmd = [
            "java",
            f"-Xmx{memory}",
            "-cp",
            classpath,
            "edu.anu.spice.SpiceScorer",
            str(src),
            "-out",
            str(dst),
            "-subset",
            "-silent",
        ]
        proc = subprocess.run(cmd, capture_output=True, check=False)
        if proc.returncode != 0 or not dst.is_file():
            raise Unavailable(
                f"SPICE failed ({proc.returncode}): {proc.stderr.decode(errors='replace')[-1500:]}"
            )
        results = {r["image_id"]: r["scores"]["All"]["f"] for r in json.loads(dst.read_text())}
    per_item = [float(results[i]) if results.get(i) is not None else float("nan") for i in ids]
    return float(np.nanmean(per_item)), per_item


def caption_scores(
    references: Mapping[str, Sequence[str]],
    predictions: Mapping[str, str],
    metrics: Iterable[str] = METRICS,
    *,
    spice_corenlp: str | Path | None = None,
) -> dict[str, float | Unavailable]:
    """Corpus-level scores of ``predictions`` (one caption per id) against ``references``.

    Returns metric name -> value, or -> ``Unavailable`` for a metric that could not run.
    Scores are on pycocoevalcap's scale (BLEU 0..1, CIDEr 0..10).
    """
    wanted = list(metrics)
    unknown = [m for m in wanted if m not in COCO_NAMES]
    if unknown:
        raise ValueError(f"unknown captioning metrics {unknown}; known: {list(COCO_NAMES)}")
    ids = [i for i in references if i in predictions]
    if not ids:
        return {m: Unavailable("no predictions for any sample with references") for m in wanted}
    try:
        gts = ptb_tokenize({i: list(references[i]) for i in ids})
        res = ptb_tokenize({i: [predictions[i]] for i in ids})
    except Unavailable as e:
        return {m: e for m in wanted}
    out: dict[str, float | Unavailable] = {}
    if any(m.startswith("bleu") for m in wanted):
        from pycocoevalcap.bleu.bleu import Bleu  # deferred: optional; only caption scores need it

        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        for n in range(4):
            if f"bleu{n + 1}" in wanted:
                out[f"bleu{n + 1}"] = float(bleu[n])
    if "meteor" in wanted:
        out["meteor"] = _meteor(gts, res)
    if "rouge_l" in wanted:
        from pycocoevalcap.rouge.rouge import Rouge  # deferred: optional; only caption scores need it

        out["rouge_l"] = float(Rouge().compute_score(gts, res)[0])
    if "cider" in wanted or "spider" in wanted:
        from pycocoevalcap.cider.cider import Cider  # deferred: optional; only caption scores need it

        cider = float(Cider().compute_score(gts, res)[0])
        if "cider" in wanted:
            out["cider"] = cider
    if "spice" in wanted or "spider" in wanted:
        try:
            spice: float | Unavailable = spice_score(gts, res, spice_corenlp)[0]
        except Unavailable as e:
            spice = e
        if "spice" in wanted:
            out["spice"] = spice
        if "spider" in wanted:
            out["spider"] = (
                (cider + spice) / 2 if isinstance(spice, float) else Unavailable(f"needs SPICE: {spice}")
            )
    return {m: out[m] for m in wanted}


def _meteor(gts: Mapping[str, list[str]], res: Mapping[str, list[str]]) -> float | Unavailable:
    from pycocoevalcap.meteor.meteor import Meteor  # deferred: optional; only caption scores need it

    reason = java_unavailable_reason()
    if reason:
        return Unavailable(reason)
    scorer = Meteor()
    try:
        return float(scorer.compute_score(gts, res)[0])
    finally:
        scorer.meteor_p.stdin.close()
        scorer.meteor_p.kill()
        scorer.meteor_p.wait()
        scorer.meteor_p = _Closed()


class _Closed:
    """Stands in for METEOR's finished process so that pycocoevalcap's ``__del__`` has nothing left to do."""

    class _Stream:
        def close(self) -> None:
            pass

    stdin = _Stream()

    def kill(self) -> None:
        pass

    def wait(self) -> None:
        pass
