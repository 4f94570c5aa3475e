"""Metrics against known values: BLEU and CIDEr on worked examples, the Fréchet distance against a
direct computation and known Gaussians, CLIP score symmetric and bounded; the feature networks
load from local paths with the names of the real weight files."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch

from nextgpt.metrics import Unavailable
from nextgpt.metrics.captioning import caption_scores, java_unavailable_reason, spice_jars
from nextgpt.metrics.embedders import clip_score
from nextgpt.metrics.frechet import frechet_distance, frechet_distance_of, gaussian_stats
from nextgpt.metrics.signals import trigger_rates

needs_java = pytest.mark.skipif(
    shutil.which("java") is None, reason="java not on PATH (apt-get install default-jre-headless)"
)


# --- captioning ------------------------------------------------------------------------------------
@needs_java
def test_bleu_worked_example():
    """Hypothesis of 8 words against a 9-word reference: p1 = 8/8, p2 = 6/7, p3 = 5/6, p4 = 4/5 and a
    brevity penalty of exp(1 - 9/8); BLEU-n is the penalty times the geometric mean of p1..pn."""
    refs = {"1": ["The quick brown fox jumps over the lazy dog."]}
    hyps = {"1": "the quick brown fox jumps over the dog"}
    s = caption_scores(refs, hyps, ["bleu1", "bleu2", "bleu4"])
    bp = math.exp(1 - 9 / 8)
    assert s["bleu1"] == pytest.approx(bp, abs=1e-6)
    assert s["bleu2"] == pytest.approx(bp * (1 * 6 / 7) ** 0.5, abs=1e-6)
    assert s["bleu4"] == pytest.approx(bp * (1 * 6 / 7 * 5 / 6 * 4 / 5) ** 0.25, abs=1e-6)
    # PTB tokenisation lower-cases and drops punctuation: a perfect match scores 1
    assert caption_scores(refs, {"1": "The quick brown fox jumps over the lazy dog!"}, ["bleu4"])[
        "bleu4"
    ] == pytest.approx(1.0)


@needs_java
def test_cider_worked_example():
    """CIDEr-D with document frequencies from the two images' references: an exact match whose
    n-grams occur in no other image's references scores 10 (cosine 1 for n = 1..4, no length
    penalty, x10); a caption sharing no n-gram scores 0; the corpus score is their mean, 5."""
    refs = {"a": ["a red bus parked by the road"], "b": ["two cats sleeping on a sofa"]}
    hyps = {"a": "a red bus parked by the road", "b": "green mountains under clouds"}
    s = caption_scores(refs, hyps, ["cider"])
    assert s["cider"] == pytest.approx(5.0, abs=1e-6)


def test_captioning_without_java_is_unavailable(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert "java not found" in java_unavailable_reason()
    s = caption_scores({"1": ["a dog"]}, {"1": "a dog"}, ["bleu4", "meteor", "cider"])
    assert all(isinstance(v, Unavailable) and "java not found" in str(v) for v in s.values())


def test_spice_without_corenlp_is_unavailable(tmp_path):
    try:
        jars = spice_jars(tmp_path)
    except Unavailable as e:
        assert "stanford-corenlp-3.6.0" in str(e) and "metrics.spice_corenlp" in str(e)
    else:  # CoreNLP is installed next to pycocoevalcap on this machine
        assert any(p.name == "stanford-corenlp-3.6.0.jar" for p in jars)


# --- Fréchet distance --------------------------------------------------------------------------------
def test_frechet_matches_a_direct_computation():
    """Against mean/covariance by numpy and Tr((S1 S2)^1/2) from the eigenvalues of S1 S2."""
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 6))
    b = rng.normal(size=(150, 6)) @ rng.normal(size=(6, 6)) * 0.5 + 0.3
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    tr_sqrt = np.sqrt(np.linalg.eigvals(s1 @ s2).real.clip(min=0)).sum()
    direct = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert frechet_distance_of(a, b) == pytest.approx(direct, rel=1e-8)
    assert frechet_distance_of(b, a) == pytest.approx(direct, rel=1e-8)


def test_frechet_of_known_gaussians():
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2
    assert frechet_distance(
        np.array([1.0]), np.array([[4.0]]), np.array([-2.0]), np.array([[9.0]])
    ) == pytest.approx(9 + 1)
    # diagonal: |mu1 - mu2|^2 + sum(a + b - 2 sqrt(ab))
    a, b = np.array([1.0, 2.0, 0.5]), np.array([3.0, 2.0, 0.125])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    known = 1 + 0 + 4 + (a + b - 2 * np.sqrt(a * b)).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(known)
    # samples of two known Gaussians approach the closed form
    rng = np.random.default_rng(1)
    x = rng.normal(mu1, np.sqrt(a), size=(40000, 3))
    y = rng.normal(mu2, np.sqrt(b), size=(40000, 3))
    assert frechet_distance_of(x, y) == pytest.approx(known, rel=0.02)


def test_frechet_of_identical_sets_is_zero():
    x = np.random.default_rng(2).normal(size=(64, 16))
    assert frechet_distance_of(x, x.copy()) == pytest.approx(0.0, abs=1e-6)


def test_frechet_needs_two_items():
    with pytest.raises(Unavailable, match="at least 2"):
        gaussian_stats(np.zeros((1, 4)))


# --- CLIP score ----------------------------------------------------------------------------------------
def test_clip_score_is_symmetric_and_bounded():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(500, 32)), rng.normal(size=(500, 32))
    s = clip_score(a, b)
    np.testing.assert_allclose(s, clip_score(b, a))
    assert (s >= 0).all() and (s <= 100).all() and (s == 0).any()  # negative cosines clip to 0
    assert clip_score(a, 3 * a) == pytest.approx(np.full(500, 100.0))
    assert clip_score(a, -a) == pytest.approx(np.zeros(500))


def test_clip_and_clap_from_local_folders(tmp_path):
    from PIL import Image

    from nextgpt.metrics.embedders import ClapEmbedder, ClipEmbedder
    from nextgpt.metrics.tiny import build_tiny_clap, build_tiny_clip

    clip = ClipEmbedder(build_tiny_clip(tmp_path / "clip"))
    images = [Image.new("RGB", (64, 48), c) for c in ("red", "blue")]
    img, txt = clip.images(images), clip.texts(["a red square", "a blue square"])
    assert img.shape == txt.shape == (2, 16)
    np.testing.assert_allclose(np.linalg.norm(img, axis=1), 1, atol=1e-5)
    s = clip_score(img, txt)
    assert ((0 <= s) & (s <= 100)).all()
    clap = ClapEmbedder(build_tiny_clap(tmp_path / "clap"))
    t = np.arange(16000 * 3) / 16000  # 3 s at 16 kHz: resampled to 48 kHz and cut to the 2 s window
    aud = clap.audios(
        [(np.sin(2 * np.pi * 440 * t), 16000), (0.1 * np.sin(2 * np.pi * 880 * t[:8000]), 16000)]
    )
    assert aud.shape == (2, 16) and clap.texts(["a beep"]).shape == (1, 16)
    with pytest.raises(Unavailable, match="feature_nets.clip"):
        ClipEmbedder(tmp_path / "nowhere")


# --- InceptionV3 (FID) and VGGish (FAD) -----------------------------------------------------------------
def test_fid_inception_has_the_names_of_the_pytorch_fid_weights(tmp_path):
    from nextgpt.metrics.inception import FIDInceptionV3, load_fid_inception
    from nextgpt.metrics.tiny import build_random_inception

    model = FIDInceptionV3()
    names = set(model.state_dict())
    # torchvision Inception3(num_classes=1008, aux_logits=False): 23,850,960 parameters
    assert sum(p.numel() for p in model.parameters()) == 23_850_960
    for key in (
        "Conv2d_1a_3x3.conv.weight",
        "Conv2d_4a_3x3.bn.running_var",
        "Mixed_5b.branch5x5_2.conv.weight",
        "Mixed_6e.branch7x7dbl_5.bn.bias",
        "Mixed_7a.branch7x7x3_4.conv.weight",
        "Mixed_7c.branch3x3dbl_3b.conv.weight",
        "fc.weight",
    ):
        assert key in names
    assert model.state_dict()["fc.weight"].shape == (1008, 2048)
    path = build_random_inception(tmp_path / "pt_inception.pth")
    loaded = load_fid_inception(path)
    with torch.no_grad():
        feats = loaded(torch.rand(2, 3, 64, 80))
    assert feats.shape == (2, 2048) and torch.isfinite(feats).all() and (feats >= 0).all()  # pool of ReLUs
    assert (feats[0] - feats[1]).abs().sum() > 0
    with pytest.raises(Unavailable, match="feature_nets.inception"):
        load_fid_inception(tmp_path / "none.pth")
    torch.save({"fc.weight": torch.zeros(3)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="bad.pth"):
        load_fid_inception(tmp_path / "bad.pth")


def test_vggish_front_end_and_embeddings(tmp_path):
    from nextgpt.metrics.tiny import build_random_vggish
    from nextgpt.metrics.vggish import EMBEDDING_DIM, load_vggish, log_mel_examples, mel_matrix

    w = mel_matrix()
    assert w.shape == (257, 64) and (w[0] == 0).all() and (w >= 0).all() and (w.max(0) > 0).all()
    t = np.arange(int(16000 * 2.0)) / 16000
    ex = log_mel_examples(np.sin(2 * np.pi * 1000 * t))
    assert ex.shape == (2, 96, 64)  # two whole 0.96 s examples in 2 s
    assert log_mel_examples(np.zeros(100)).shape == (1, 96, 64)  # a short clip is padded to one example
    model = load_vggish(build_random_vggish(tmp_path / "vggish.pth"))
    emb = model.embed(np.sin(2 * np.pi * 440 * np.arange(44100 * 2) / 44100), 44100)  # resampled to 16 kHz
    assert emb.shape == (2, EMBEDDING_DIM) and np.isfinite(emb).all()
    with pytest.raises(Unavailable, match="feature_nets.vggish"):
        load_vggish(tmp_path / "none.pth")


# --- trigger rate ----------------------------------------------------------------------------------------
def test_trigger_rate_counts_only_the_asked_modality():
    groups = [["image"], ["image", "image"], ["image", "audio"], [], ["video"]]
    r = trigger_rates(groups, "image")
    assert r["trigger_rate"] == pytest.approx(2 / 5)  # the audio alongside disqualifies the third
    assert r["emitted_rate"] == pytest.approx(3 / 5) and r["other_modality_rate"] == pytest.approx(2 / 5)
    assert r["no_signal_rate"] == pytest.approx(1 / 5) and r["multiple_groups_rate"] == pytest.approx(2 / 5)
    text = trigger_rates(groups, None)  # asked for a caption: no group is right
    assert text["trigger_rate"] == pytest.approx(1 / 5) and text["expected"] == "text"
