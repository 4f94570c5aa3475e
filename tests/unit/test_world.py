"""The toy world's measuring instruments (nextgpt.world): captions read back into attributes, and
the analysers that read the same attributes from media, checked against the generator's own items
(true by construction) and against media that show nothing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from nextgpt.world.analysers import audio_attributes, file_attributes, image_attributes, video_attributes
from nextgpt.world.attributes import ATTRIBUTES, caption_attributes, chance
from nextgpt.world.synthetic import MEDIA_DIRS, dataset_name, write_synthetic


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("world")
    write_synthetic(root, num_per_modality=40, seed=1234)
    return root


def items(root: Path, modality: str) -> list[tuple[Path, str]]:
    folder = root / dataset_name(modality)
    entries = json.loads((folder / f"{dataset_name(modality)}.json").read_text())
    return [(folder / MEDIA_DIRS[modality] / e[f"{modality}_name"], e["caption"]) for e in entries]


@pytest.mark.parametrize(
    "text,modality,expected",
    [
        (
            "a red circle at the top left on a black background",
            "image",
            {"colour": "red", "shape": "circle", "position": "top left"},
        ),
        (
            "A Blue triangle in the centre.",
            "image",
            {"colour": "blue", "shape": "triangle", "position": "centre"},
        ),
        (
            "a green square at the bottom right and a red circle at the top left",
            "image",
            {"colour": "green", "shape": "square", "position": "bottom right"},
        ),
        (
            "a loud high pitched beeping tone",
            "audio",
            {"pitch": "high", "loudness": "loud", "pattern": "beeping"},
        ),
        (
            "a quiet low-pitched steady tone",
            "audio",
            {"pitch": "low", "loudness": "quiet", "pattern": "steady"},
        ),
        ("a purple square moving to the left", "video", {"colour": "purple", "direction": "left"}),
        ("a white square moving up", "video", {"colour": "white", "direction": "up"}),
        ("Sure, here it is.", "image", {"colour": None, "shape": None, "position": None}),
    ],
)
def test_captions_are_read_back_into_attributes(text, modality, expected):
    assert caption_attributes(text, modality) == expected


def test_chance_is_one_over_the_values():
    assert chance("image") == {"colour": 1 / 7, "shape": 1 / 3, "position": 1 / 5}
    assert set(chance("video")) == set(ATTRIBUTES["video"])


@pytest.mark.parametrize("modality", ["image", "audio", "video"])
def test_the_analysers_read_the_generators_items_as_their_captions_say(world, modality):
    """Every attribute of every item (images: of one shape) is read back exactly."""
    checked = 0
    for path, caption in items(world, modality):
        if modality == "image" and " and a " in caption:
            continue
        assert file_attributes(path, modality) == caption_attributes(caption, modality), (path.name, caption)
        checked += 1
    assert checked >= 20


def test_the_analysers_find_nothing_where_nothing_is_shown():
    assert image_attributes(np.zeros((32, 32, 3), np.uint8)) == {
        "colour": None,
        "shape": None,
        "position": None,
    }
    assert audio_attributes(np.zeros(16000, np.float32)) == {"pitch": None, "loudness": None, "pattern": None}
    still = np.zeros((8, 64, 64, 3), np.uint8)
    still[:, 10:24, 10:24] = (220, 30, 30)
    assert video_attributes(still)["direction"] in (
        "right",
        "left",
        "up",
        "down",
    )  # no motion: a guess, not a crash
    assert video_attributes(np.zeros((8, 64, 64, 3), np.uint8)) == {"colour": None, "direction": None}


def test_noise_scores_near_chance_not_near_perfect():
    """What a random decoder makes (noise) must not read as the right attributes."""
    rng = np.random.default_rng(0)
    truth = {"colour": "red", "shape": "circle", "position": "top left"}
    hits = sum(
        image_attributes(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))[a] == v
        for _ in range(50)
        for a, v in truth.items()
    )
    assert hits / 150 < 0.45


def test_the_world_imagebind_is_built_once_loads_through_the_real_path_and_beats_chance(world_small):
    """`python -m nextgpt.world.build --small`: trained, cached (a second call is a no-op), saved in
    imagebind_huge.pth's format and loaded by the project's own loader; held-out caption retrieval
    above chance (the full build's figures are in the README)."""
    import torch

    from nextgpt.encoders.imagebind import load_imagebind
    from nextgpt.encoders.imagebind_config import ImageBindConfig
    from nextgpt.world.build import build_world, imagebind_path

    out = world_small  # built by the session fixture, as the learning test uses it
    report = json.loads((out / "report.json").read_text())["imagebind"]
    stamp = imagebind_path(out).stat().st_mtime_ns
    assert (
        build_world(out, out.parent / "tiny_backbones", small=True) == out
        and imagebind_path(out).stat().st_mtime_ns == stamp
    )
    model = load_imagebind(imagebind_path(out), ImageBindConfig.tiny())
    saved = torch.load(imagebind_path(out), weights_only=True)
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    got, chance_ = report["retrieval_top1"], report["chance"]
    assert sum(got.values()) > 1.5 * sum(chance_.values()), report
    assert report["final_loss"] < 2.4  # from about 2.8 (the in-batch InfoNCE of a random model)
    # the world Stable Diffusion: saved with save_pretrained, read back by the project's decoder loader,
    # a clean-sample (DDIM) model whose UNet also pools the text, trained (its losses fell)
    from nextgpt.decoders import load_pipeline

    sd = json.loads((out / "report.json").read_text())["sd"]
    pipe = load_pipeline(out / "sd")
    assert (
        type(pipe).__name__ == "StableDiffusionPipeline" and pipe.scheduler.config.prediction_type == "sample"
    )
    assert pipe.unet.config.addition_embed_type == "text"
    assert sd["vae_mse"] < 0.1 and set(sd["generated_attributes"]) == {"colour", "shape", "position"}, sd
    # the world AudioLDM (its own HiFi-GAN vocoder at AudioLDM's hop) and text-to-video (a UNet3D): the
    # same, each read back by its pipeline class and trained (the vocoder, VAE and UNet losses are reported)
    for folder, cls, attrs in (
        ("audioldm", "AudioLDMPipeline", {"pitch", "loudness", "pattern"}),
        ("t2v", "TextToVideoSDPipeline", {"colour", "direction"}),
    ):
        decoder = json.loads((out / "report.json").read_text())[folder]
        pipe = load_pipeline(out / folder)
        assert type(pipe).__name__ == cls and pipe.scheduler.config.prediction_type == "sample"
        assert set(decoder["generated_attributes"]) == set(decoder["random_decoder"]) == attrs, decoder
        assert np.isfinite(
            [decoder["final_loss"], decoder["vae_mse"], decoder.get("vocoder_loss", 0.0)]
        ).all(), decoder
    # the world LLM: the tiny Llama's files, read back by from_pretrained, pre-trained further (its loss fell)
    from transformers import AutoModelForCausalLM

    llm = json.loads((out / "report.json").read_text())["llm"]
    assert type(AutoModelForCausalLM.from_pretrained(out / "llm")).__name__ == "LlamaForCausalLM"
    assert set(llm["restatement_of_held_out_requests"]) == {
        "image/colour",
        "image/shape",
        "image/position",
        "audio/pitch",
        "audio/loudness",
        "audio/pattern",
        "video/colour",
        "video/direction",
    }
    assert llm["final_loss"] < 3.0, llm
