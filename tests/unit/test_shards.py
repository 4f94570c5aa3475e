"""WebDataset shards: writing (prepare), reading every record kind back, exact split over ranks and
workers, exact mid-epoch resume, bad samples, in-memory media decoding, img2dataset shards as they are."""

from __future__ import annotations

import io
import json
import logging
import tarfile
from collections import Counter
from itertools import islice
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

from datamodules import prepare, shards
from datamodules.nextgpt_layout import read_source
from datamodules.prepare import prepare_nextgpt
from datamodules.shard_writer import pair_record, write_shards
from datamodules.shards import ShardStream, TrackingCollate
from datamodules.shards.sample import ShardSample, SkipSample
from datamodules.shards.skips import TooManySkipped
from nextgpt import modality as modality_registry
from nextgpt.encoders.preprocess import MediaDecodeError, load_audio, load_image, load_video

MODALITIES = {"image": "synthetic_image", "audio": "synthetic_audio", "video": "synthetic_video"}
REAL = {"image": "cc3m", "audio": "audiocap", "video": "webvid"}


def decode_media(sample: ShardSample) -> list[tuple[str, torch.Tensor]]:
    """A stream ``transform`` for these tests: the sample's input media as encoder tensors, decoded
    from memory (a broken member raises, and the stream counts the skip)."""
    out = []
    for name, member in sample.conversation.media_in:
        data = sample.media.get(member)
        if data is None:
            raise SkipSample("missing media member", member)
        buf = io.BytesIO(data)
        buf.name = f"{sample.shard}:{member}"
        out.append((name, modality_registry.get(name).load(buf)))
    return out


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    from nextgpt.world.synthetic import write_synthetic

    root = tmp_path_factory.mktemp("synthetic")
    write_synthetic(root, num_per_modality=4)
    return root


@pytest.fixture(scope="module")
def tiny_jpg(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("media") / "tiny.jpg"
    Image.fromarray(np.full((8, 8, 3), 120, np.uint8)).save(path)
    return path


def keys_of(stream) -> list[str]:
    return [s.key for s in stream]


# ---------------------------------------------------------------------------------------------
# write -> read back
# ---------------------------------------------------------------------------------------------
def check_roundtrip(sources: dict[str, Path], out: Path, shard_size: int) -> None:
    """Every conversation the JSON readers make comes back from the shards, media bytes intact."""
    for modality, folder in sources.items():
        prepare_nextgpt(folder, folder.name, modality, out, shard_size=shard_size)
    for objective, pattern in (("caption", "pairs"), ("generate", "pairs"), ("instruct", "instruct")):
        for modality, folder in sources.items():
            expected, skipped = read_source(folder.name, modality, folder, objective)
            assert not skipped
            got = list(ShardStream(str(out / f"{folder.name}-{pattern}-*.tar"), objective=objective))
            assert len(got) == len(expected) > 0, (objective, folder.name)
            for sample, ref in zip(got, expected, strict=False):
                conv = sample.conversation
                assert (conv.key, conv.turns, conv.captions_out) == (ref.key, ref.turns, ref.captions_out), (
                    sample.where
                )
                assert [m for m, _ in conv.media_in] == [m for m, _ in ref.media_in]
                for (_, member), (_, path) in zip(conv.media_in, ref.media_in, strict=False):
                    assert sample.media[member] == Path(path).read_bytes(), sample.where
                assert sample.source == f"{folder.name}-{pattern}"
    index = json.loads((out / f"{next(iter(sources.values())).name}-pairs.shards.json").read_text())
    assert index["total"] == sum(s["samples"] for s in index["shards"]) and not list(out.glob("*.tmp"))


def test_write_and_read_back_synthetic(synthetic: Path, tmp_path: Path) -> None:
    check_roundtrip({m: synthetic / d for m, d in MODALITIES.items()}, tmp_path, shard_size=3)


@pytest.mark.real_data
def test_write_and_read_back_real_sample(sample_root: Path, tmp_path: Path) -> None:
    check_roundtrip({m: sample_root / d for m, d in REAL.items()}, tmp_path, shard_size=5)
    # decoded from shard bytes == decoded from the file, for one sample of each modality
    for objective, modality, folder in (("caption", m, sample_root / d) for m, d in REAL.items()):
        sample = next(iter(ShardStream(str(tmp_path / f"{folder.name}-pairs-*.tar"), objective=objective)))
        ((name, tensor),) = decode_media(sample)
        ref = read_source(folder.name, modality, folder, objective)[0][0]
        assert name == modality and torch.equal(
            tensor, modality_registry.get(modality).load(ref.media_in[0][1])
        )


@pytest.mark.real_data
def test_img2dataset_shards_read_as_pairs(sample_root: Path) -> None:
    folder = sample_root.parent / "img2dataset_cc3m"
    if not folder.is_dir():
        pytest.skip(f"img2dataset shards not found at {folder}")
    stream = ShardStream(folder, objective="caption", modality="image", transform=decode_media)
    got = list(stream)
    captions = {}
    for shard in sorted(folder.glob("*.tar")):  # whatever the shards are called
        with tarfile.open(shard) as tar:
            captions.update(
                {
                    Path(m.name).stem: tar.extractfile(m).read().decode().strip()
                    for m in tar
                    if m.name.endswith(".txt")
                }
            )
    assert len(got) == len(captions) and not stream.skipped
    cc3m = {e["caption"] for e in json.loads((sample_root / "cc3m" / "cc3m.json").read_text())}
    for s in got:
        ((human, answer),) = s.conversation.turns
        assert human.startswith("<image>\n") and answer == captions[s.key] and answer in cc3m
        ((name, tensor),) = s.item
        assert name == "image" and tensor.shape == (3, 224, 224)
    generate = list(ShardStream(folder, objective="generate", modality="image"))
    assert [s.conversation.captions_out for s in generate] == [[("image", captions[s.key])] for s in generate]


def test_output_media_on_request(synthetic: Path, tmp_path: Path) -> None:
    """Targets of output groups (a denoising loss needs them) are read only when asked for."""
    folder = synthetic / "synthetic_image"
    prepare_nextgpt(folder, folder.name, "image", tmp_path, shard_size=3)
    files = {p.name: p.read_bytes() for p in (folder / "images").iterdir()}
    assert all(s.media == {} for s in ShardStream(str(tmp_path / "*-pairs-*.tar"), objective="generate"))
    for pattern, objective in (("pairs", "generate"), ("instruct", "instruct")):
        got = [
            s
            for s in ShardStream(str(tmp_path / f"*-{pattern}-*.tar"), objective=objective, output_media=True)
            if s.conversation.captions_out
        ]
        assert len(got) == len(files)
        for s in got:
            (data,) = s.media.values()
            assert data in files.values(), s.where
            if hasattr(s.conversation, "media_out"):
                assert s.conversation.media_out == [("image", next(iter(s.media)))]


def test_keys_are_tar_safe_unique_and_shards_atomic(tiny_jpg: Path, tmp_path: Path) -> None:
    recs = [
        pair_record(k, "image", f"caption {i}", tiny_jpg)
        for i, k in enumerate(["a.b/c", "a_b_c", "x y", "a.b/c"])
    ]
    recs.append(pair_record("lost", "image", "no file", tmp_path / "missing.jpg"))
    paths = write_shards(recs, tmp_path / "out", name="set", shard_size=3)
    assert [p.name for p in paths] == ["set-000000.tar", "set-000001.tar"]
    index = json.loads((tmp_path / "out" / "set.shards.json").read_text())
    assert index["total"] == 4 and [s["samples"] for s in index["shards"]] == [3, 1]
    assert index["skipped"] == {"missing media file": 1}
    got = list(ShardStream(tmp_path / "out"))
    assert [s.key for s in got] == ["a_b_c", "a_b_c_1", "x_y", "a_b_c_2"]
    assert [s.conversation.key for s in got] == ["a.b/c", "a_b_c", "x y", "a.b/c"]  # the source id is kept
    with pytest.raises(FileExistsError, match="overwrite"):
        write_shards(recs[:1], tmp_path / "out", name="set")
    assert len(write_shards(recs[:1], tmp_path / "out", name="set", overwrite=True)) == 1
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["set-000000.tar", "set.shards.json"]
    with pytest.raises(FileNotFoundError, match="lost"):
        write_shards(recs[-1:], tmp_path / "strict", name="s", strict=True)


def test_instruction_formats_and_cli(synthetic: Path, tmp_path: Path, capsys) -> None:
    img = synthetic / "synthetic_image" / "images"
    aud = synthetic / "synthetic_audio" / "audios"
    first_img, first_aud = min(img.iterdir()).name, min(aud.iterdir()).name
    llava = [
        {
            "id": "l1",
            "image": first_img,
            "conversations": [  # no <image>: prepended
                {"from": "human", "value": "What is shown?"},
                {"from": "gpt", "value": "Shapes."},
                {"from": "human", "value": "Colours?"},
                {"from": "gpt", "value": "Green."},
            ],
        },
        {
            "id": "l2",
            "image": first_img,
            "conversations": [
                {"from": "human", "value": "<image> <image>"},
                {"from": "gpt", "value": "two?"},
            ],
        },  # skipped
    ]
    # media names stay inside --media-root (a "../" name is refused): the root holds both sources
    mosit = [
        {
            "id": "m1",
            "input_image": f"synthetic_image/images/{first_img}",
            "output_audio": f"synthetic_audio/audios/{first_aud}",
            "audio_captions": "a beep",
            "conversations": [
                {"from": "human", "value": "<image>\nMake a sound for it"},
                {"from": "gpt", "value": "Here: <audio>"},
            ],
        }
    ]
    alpaca = [
        {"instruction": "Add 2 and 3.", "input": "", "output": "5"},
        {"instruction": "Echo", "input": "hi", "output": "hi"},
    ]
    files = {}
    for name, data in (("llava", llava), ("mosit", mosit), ("alpaca", alpaca)):
        files[name] = tmp_path / f"{name}.json"
        files[name].write_text(json.dumps(data))
    out = tmp_path / "shards"
    assert (
        prepare.main(
            ["--format", "llava", "--json", str(files["llava"]), "--media-root", str(img), "--out", str(out)]
        )
        == 0
    )
    assert (
        prepare.main(
            [
                "--format",
                "mosit",
                "--json",
                str(files["mosit"]),
                "--media-root",
                str(synthetic),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert (
        prepare.main(
            ["--format", "alpaca", "--json", str(files["alpaca"]), "--out", str(out), "--name", "alp"]
        )
        == 0
    )
    assert (
        prepare.main(
            [
                "--format",
                "nextgpt",
                "--root",
                str(synthetic / "synthetic_audio"),
                "--name",
                "synthetic_audio",
                "--modality",
                "audio",
                "--out",
                str(out),
                "--shard-size",
                "2",
            ]
        )
        == 0
    )
    assert prepare.main(["--format", "alpaca", "--json", str(tmp_path / "nope.json"), "--out", str(out)]) == 2
    assert "nope.json" in capsys.readouterr().err
    got = {
        s.conversation.key: s
        for s in ShardStream(
            [out / "llava-000000.tar", out / "mosit-000000.tar", out / "alp-000000.tar"], objective="instruct"
        )
    }
    assert sorted(got) == ["00000000", "00000001", "l1", "m1"]
    l1 = got["l1"].conversation
    assert l1.turns == [("<image>\nWhat is shown?", "Shapes."), ("Colours?", "Green.")]
    assert got["l1"].media[l1.media_in[0][1]] == (img / first_img).read_bytes()
    m1 = got["m1"].conversation
    assert m1.media_in == [("image", "m1.in0.png")] and m1.captions_out == [("audio", "a beep")]
    with tarfile.open(out / "mosit-000000.tar") as t:
        assert t.extractfile("m1.out0.wav").read() == (aud / first_aud).read_bytes()
    assert got["00000001"].conversation.turns == [("Echo\nhi", "hi")] and got["00000001"].media == {}
    assert json.loads((out / "llava.shards.json").read_text())["total"] == 1


# ---------------------------------------------------------------------------------------------
# exact split over ranks x workers
# ---------------------------------------------------------------------------------------------
def pair_shards(folder: Path, jpg: Path, n: int, shard_size: int) -> list[str]:
    write_shards(
        (pair_record(f"s{i:03d}", "image", f"caption {i}", jpg) for i in range(n)),
        folder,
        name="p",
        shard_size=shard_size,
    )
    return [f"s{i:03d}" for i in range(n)]


def collect_keys(items: list) -> dict:
    return {"keys": [s.key for s in items]}


@pytest.mark.parametrize("shard_size,num_shards", [(7, 4), (4, 7)])
@pytest.mark.parametrize("shuffle", [False, True], ids=["ordered", "shuffled"])
def test_split_over_ranks_and_dataloader_workers(
    tiny_jpg: Path, tmp_path: Path, shard_size: int, num_shards: int, shuffle: bool
) -> None:
    expected = pair_shards(tmp_path, tiny_jpg, 25, shard_size)
    assert len(list(tmp_path.glob("*.tar"))) == num_shards
    got: list[str] = []
    for rank in range(2):
        stream = ShardStream(tmp_path, rank=rank, world_size=2, shuffle=shuffle, shuffle_shards=3, seed=3)
        loader = DataLoader(stream, batch_size=2, num_workers=3, collate_fn=TrackingCollate(collect_keys))
        for batch in loader:
            got += batch["keys"]
            assert all(
                p.rank == rank and p.world_size == 2 and p.num_workers == 3 for p in batch["stream_positions"]
            )
    assert sorted(got) == expected  # none lost, none twice


@pytest.mark.parametrize("num_samples,shard_size,world,workers", [(5, 5, 2, 3), (3, 1, 2, 4), (40, 13, 3, 2)])
def test_split_simulated_workers_fewer_shards_than_consumers(
    tiny_jpg: Path, tmp_path: Path, monkeypatch, num_samples: int, shard_size: int, world: int, workers: int
) -> None:
    expected = pair_shards(tmp_path, tiny_jpg, num_samples, shard_size)
    per_consumer = []
    for rank in range(world):
        for w in range(workers):
            monkeypatch.setattr(
                shards, "get_worker_info", lambda w=w: SimpleNamespace(id=w, num_workers=workers)
            )
            per_consumer.append(keys_of(ShardStream(tmp_path, rank=rank, world_size=world, shuffle=True)))
    assert sorted(k for ks in per_consumer for k in ks) == expected
    sizes = [len(ks) for ks in per_consumer]
    assert max(sizes) - min(sizes) <= 1


# ---------------------------------------------------------------------------------------------
# exact resume
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [0, 5, 25, 31, 50])
def test_resume_in_process_is_exact(tiny_jpg: Path, tmp_path: Path, k: int) -> None:
    pair_shards(tmp_path, tiny_jpg, 25, 6)

    def make():
        return ShardStream(tmp_path, shuffle=True, shuffle_shards=2, seed=7, epochs=2)

    full = keys_of(make())
    assert len(full) == 50 and full[:25] != full[25:] and sorted(full[:25]) == sorted(full[25:])
    first = make()
    head = [s.key for s in islice(iter(first), k)]
    state = json.loads(json.dumps(first.state_dict()))  # plain data: goes into any checkpoint
    resumed = make()
    resumed.load_state_dict(state)
    rest = keys_of(resumed)
    if k < len(full):
        assert head + rest == full
    else:  # saved after its last sample: the restart runs the next passes, as the saved stream's next iteration would
        after = make()
        after.set_epoch(2)
        assert head == full and rest == keys_of(after) and len(rest) == 50
    # passes: a one-pass stream advances by itself, and set_epoch picks a pass
    one = ShardStream(tmp_path, shuffle=True, shuffle_shards=2, seed=7)
    assert keys_of(one) == full[:25] and keys_of(one) == full[25:]
    one.set_epoch(1)
    assert keys_of(one) == full[25:]


def test_resume_with_dataloader_workers_is_exact(tiny_jpg: Path, tmp_path: Path) -> None:
    """Workers yield in copies of the stream; the training side reports what it consumed."""
    pair_shards(tmp_path, tiny_jpg, 23, 5)

    def loader(stream: ShardStream) -> DataLoader:
        return DataLoader(stream, batch_size=3, num_workers=2, collate_fn=TrackingCollate(collect_keys))

    def make():
        return ShardStream(tmp_path, shuffle=True, seed=1, epochs=None, rank=0, world_size=1)

    full = [b["keys"] for b in islice(loader(make()), 12)]  # endless: crosses pass boundaries
    first = make()
    head = []
    for batch in islice(loader(first), 5):  # an odd count: the other worker delivers next
        first.mark_consumed(batch.pop("stream_positions"))
        head.append(batch["keys"])
    state = first.state_dict()
    assert state["rotation"] == {"0": 1} and state["topology"] == [1, 2]
    resumed = make()
    resumed.load_state_dict(torch.load(io.BytesIO(_saved(state)), weights_only=True))
    assert head + [b["keys"] for b in islice(loader(resumed), 7)] == full
    other = make()
    other.load_state_dict(state)
    with pytest.raises(ValueError, match="num_workers=2"):
        next(iter(DataLoader(other, batch_size=3, num_workers=0, collate_fn=TrackingCollate(collect_keys))))
    moved = ShardStream(tmp_path, shuffle=True, seed=2)
    with pytest.raises(ValueError, match="seed"):
        moved.load_state_dict(state)


def _saved(state: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# bad samples
# ---------------------------------------------------------------------------------------------
def _jpeg_bytes(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(
        buf, "JPEG"
    )
    return buf.getvalue()


def damaged_shard(folder: Path) -> tuple[list[str], dict[str, int]]:
    """Good img2dataset-style pairs with one sample of each kind of damage among them."""

    def pair(cap, mod, ext):
        return json.dumps({"kind": "pair", "caption": cap, "media": [mod, ext]}).encode()

    bad = {
        "truncjpeg": {"jpg": _jpeg_bytes(0)[:300], "txt": b"a truncated jpeg"},
        "textmp4": {"json": pair("a text file named .mp4", "video", "mp4"), "mp4": b"not a video\n" * 30},
        "nocaption": {
            "jpg": _jpeg_bytes(1),
            "json": json.dumps({"url": "http://x", "status": "success"}).encode(),
        },
        "emptycaption": {"jpg": _jpeg_bytes(2), "txt": b"   \n"},
        "wrongtype": {"jpg": _jpeg_bytes(3), "json": b"[1, 2, 3]"},
        "captionint": {"json": pair(123, "image", "jpg"), "jpg": _jpeg_bytes(4)},
        "nomember": {"json": pair("the jpg is missing", "image", "jpg")},
    }
    reasons = {
        "undecodable media": 2,
        "missing caption": 1,
        "empty caption": 1,
        "wrong JSON type": 2,
        "missing media member": 1,
    }
    good = [f"good{i:02d}" for i in range(16)]
    order = [k for pair_ in zip(good, list(bad) + [None] * len(good), strict=False) for k in pair_ if k]
    with open(folder / "bad-000000.tar", "wb") as f, wds.TarWriter(f, encoder=False) as w:
        for key in order:
            members = bad.get(key) or {"jpg": _jpeg_bytes(10), "txt": f"good caption {key}".encode()}
            w.write({"__key__": key, **members})
    return good, reasons


def test_bad_samples_are_skipped_counted_and_named(tmp_path: Path, caplog) -> None:
    good, reasons = damaged_shard(tmp_path)
    stream = ShardStream(tmp_path, modality="image", transform=decode_media, max_skip_fraction=None)
    with caplog.at_level(logging.WARNING, logger="datamodules.shards"):
        got = list(stream)
    assert [s.key for s in got] == good and all(s.item[0][1].shape == (3, 224, 224) for s in got)
    assert stream.skipped == Counter(reasons)
    assert stream.seen == len(good) + sum(reasons.values())
    log = caplog.text
    for where in ("bad-000000.tar:truncjpeg", "bad-000000.tar:textmp4", "bad-000000.tar:nomember"):
        assert where in log
    # the skips travel with the next good sample's position (how a worker's counts reach the trainer)
    assert sum(n for s in got for _, n in s.position.skipped) == sum(reasons.values())
    assert sum(s.position.seen for s in got) == stream.seen
    stream.record_skip("bad-000000.tar:good00", "undecodable media", "decoded later")
    assert stream.skipped["undecodable media"] == 3


def test_too_many_bad_samples_raise(tmp_path: Path) -> None:
    damaged_shard(tmp_path)
    stream = ShardStream(
        tmp_path, modality="image", transform=decode_media, max_skip_fraction=0.1, min_samples=20
    )
    with pytest.raises(
        TooManySkipped,
        match=r"\d+ of 20 samples skipped \(\d+\.\d% > max_skip_fraction 10\.0%\).*"
        r"missing caption",
    ):
        list(stream)
    lenient = ShardStream(tmp_path, modality="image", transform=decode_media, max_skip_fraction=0.5)
    assert len(list(lenient)) == 16


def test_pair_shards_need_a_modality_or_pair_task(tmp_path: Path, tiny_jpg: Path) -> None:
    damaged_shard(tmp_path)
    with pytest.raises(ValueError, match=r"bad-000000.tar:good00 .*modality="):
        next(iter(ShardStream(tmp_path)))
    pair_shards(tmp_path / "p", tiny_jpg, 2, 2)
    with pytest.raises(ValueError, match="pair_objective"):
        next(iter(ShardStream(tmp_path / "p", objective="instruct")))
    assert len(list(ShardStream(tmp_path / "p", objective="instruct", pair_objective="generate"))) == 2
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        ShardStream(tmp_path / "nothing-here-{000000..000001}.tar")


# ---------------------------------------------------------------------------------------------
# media from bytes
# ---------------------------------------------------------------------------------------------
def test_loaders_accept_bytes_and_file_objects(synthetic: Path) -> None:
    for loader, folder in (
        (load_image, "synthetic_image/images"),
        (load_audio, "synthetic_audio/audios"),
        (load_video, "synthetic_video/videos"),
    ):
        path = min((synthetic / folder).iterdir())
        ref = loader(path)
        buf = io.BytesIO(path.read_bytes())
        buf.name = "s-000000.tar:k.ext"
        assert torch.equal(loader(path.read_bytes(), name="s-000000.tar:k"), ref)
        assert torch.equal(loader(buf), ref)
        with pytest.raises(MediaDecodeError, match="s-000001.tar:bad") as e:
            loader(b"this is not media at all" * 10, name="s-000001.tar:bad")
        assert e.value.path == "s-000001.tar:bad"
        with pytest.raises(MediaDecodeError, match="empty"):
            loader(b"", name="s:k")


# ---------------------------------------------------------------------------------------------
# Lightning: the wiring the DataModule will use
# ---------------------------------------------------------------------------------------------
def test_lightning_checkpoint_resume_is_exact(tiny_jpg: Path, tmp_path: Path) -> None:
    """DataModule state_dict/load_state_dict carry the stream state; on_before_batch_transfer marks
    what the training step gets (so Lightning's one-batch prefetch is not counted)."""
    import lightning as L

    pair_shards(tmp_path / "shards", tiny_jpg, 17, 4)

    class Data(L.LightningDataModule):
        def setup(self, stage: str) -> None:
            self.stream = ShardStream(tmp_path / "shards", shuffle=True, seed=5, epochs=None)

        def train_dataloader(self) -> DataLoader:
            return DataLoader(
                self.stream, batch_size=2, num_workers=2, collate_fn=TrackingCollate(collect_keys)
            )

        def on_before_batch_transfer(self, batch, dataloader_idx: int):
            if self.trainer.training:
                self.stream.mark_consumed(batch.pop("stream_positions"))
            return batch

        def state_dict(self) -> dict:
            return {"stream": self.stream.state_dict()}

        def load_state_dict(self, state: dict) -> None:
            self.stream.load_state_dict(state["stream"])

    class Model(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.seen: list[list[str]] = []

        def training_step(self, batch, batch_idx):
            self.seen.append(batch["keys"])
            return (self.w - 1).pow(2).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    def fit(max_steps: int, ckpt: str | None = None, **kw) -> Model:
        model = Model()
        trainer = L.Trainer(
            max_steps=max_steps,
            limit_train_batches=4,
            accelerator="cpu",
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=tmp_path,
            **kw,
        )
        trainer.fit(model, datamodule=Data(), ckpt_path=ckpt)
        return model

    full = fit(10, enable_checkpointing=False).seen  # 2.5 "epochs" of 4 batches over an endless stream
    ckpt = L.pytorch.callbacks.ModelCheckpoint(
        dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1
    )
    fit(7, callbacks=[ckpt])
    for name, step in (
        ("epoch=0-step=3.ckpt", 3),
        ("epoch=1-step=6.ckpt", 6),
    ):  # odd step: the 2nd worker is next
        assert fit(10, str(tmp_path / "ckpt" / name), enable_checkpointing=False).seen == full[step:], name


def _ddp_rank(rank: int, folder: str, init: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        stream = ShardStream(
            folder, shuffle=True, seed=4, epochs=None
        )  # rank and world from torch.distributed
        head = [s.key for s in islice(iter(stream), 3 + rank)]  # ranks stop at different points
        state = stream.state_dict()  # a collective: every rank gets every rank's progress
        Path(out, f"rank{rank}.json").write_text(json.dumps({"head": head, "state": state}))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.distributed
def test_state_is_gathered_over_ranks(tiny_jpg: Path, tmp_path: Path) -> None:
    pair_shards(tmp_path / "shards", tiny_jpg, 11, 4)
    torch.multiprocessing.spawn(
        _ddp_rank,
        args=(str(tmp_path / "shards"), f"file://{tmp_path / 'init'}", str(tmp_path)),
        nprocs=2,
        join=True,
    )
    runs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert runs[0]["state"] == runs[1]["state"] and sorted(runs[0]["state"]["progress"]) == ["0:0", "1:0"]
    for rank, run in enumerate(runs):  # each rank resumes from the one checkpoint that rank 0 would write
        full = [
            s.key
            for s in islice(
                iter(
                    ShardStream(
                        tmp_path / "shards", shuffle=True, seed=4, epochs=None, rank=rank, world_size=2
                    )
                ),
                12,
            )
        ]
        resumed = ShardStream(tmp_path / "shards", shuffle=True, seed=4, epochs=None, rank=rank, world_size=2)
        resumed.load_state_dict(runs[0]["state"])
        assert run["head"] + [s.key for s in islice(iter(resumed), 12 - len(run["head"]))] == full


# ---------------------------------------------------------------------------------------------
# the reference's data mix: one source per batch, sources taking turns
# ---------------------------------------------------------------------------------------------
def balanced_sources(
    tmp_path: Path, jpg: Path, sizes: dict[str, int], shard_size: int = 3
) -> list[list[Path]]:
    out = []
    for name, n in sizes.items():
        folder = tmp_path / name
        write_shards(
            (pair_record(f"{name}{i:03d}", "image", f"{name} caption {i}", jpg) for i in range(n)),
            folder,
            name=name,
            shard_size=shard_size,
        )
        out.append(sorted(folder.glob("*.tar")))
    return out


@pytest.mark.parametrize("world,workers", [(1, 0), (2, 2)])
def test_balanced_mix_gives_each_source_its_turns_one_source_a_batch(
    tiny_jpg: Path, tmp_path: Path, world: int, workers: int
) -> None:
    sizes = {"big": 20, "mid": 7, "small": 3}
    sources = balanced_sources(tmp_path, tiny_jpg, sizes)
    consumers = world * max(workers, 1)
    batches: list[list[str]] = []
    for rank in range(world):
        stream = ShardStream(
            tmp_path,
            mix="balanced",
            sources=sources,
            batch_size=2,
            rank=rank,
            world_size=world,
            shuffle=True,
            seed=5,
            epochs=1,
        )
        per_pass = stream.blocks_per_pass(consumers)
        assert per_pass == 3 * -(-20 // (consumers * 2))  # every source's turns until "big" is used up once
        loader = DataLoader(
            stream, batch_size=None, num_workers=workers, collate_fn=TrackingCollate(collect_keys)
        )
        got = [b["keys"] for b in loader]
        assert len(got) == per_pass * max(workers, 1)
        batches += got
    for keys in batches:
        assert len({k.rstrip("0123456789") for k in keys}) == 1  # one source per batch
    per_source = Counter(k.rstrip("0123456789") for keys in batches for k in keys)
    assert (
        per_source["big"] == per_source["mid"] == per_source["small"]
    )  # equal turns, smaller sources redrawn
    big = [k for keys in batches for k in keys if k.startswith("big")]
    assert (
        sorted(set(big)) == sorted(f"big{i:03d}" for i in range(20))
        and len(big) - len(set(big)) < consumers * 2
    )
    # in one process the batches of a round come from the sources in turn
    if world == 1 and workers == 0:
        assert [b[0].rstrip("0123456789") for b in batches[:6]] == ["big", "mid", "small"] * 2


def test_balanced_mix_resumes_exactly_mid_pass(tiny_jpg: Path, tmp_path: Path) -> None:
    sources = balanced_sources(tmp_path, tiny_jpg, {"a": 9, "b": 4})

    def loader(stream: ShardStream) -> DataLoader:
        return DataLoader(stream, batch_size=None, num_workers=2, collate_fn=TrackingCollate(collect_keys))

    def make():
        return ShardStream(
            tmp_path,
            mix="balanced",
            sources=sources,
            batch_size=3,
            seed=1,
            epochs=None,  # noqa: E731
            rank=0,
            world_size=1,
            shuffle=True,
        )

    full = [b["keys"] for b in islice(loader(make()), 9)]  # crosses a pass boundary
    first = make()
    head = []
    for batch in islice(loader(first), 5):
        first.mark_consumed(batch.pop("stream_positions"))
        head.append(batch["keys"])
    resumed = make()
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert head + [b["keys"] for b in islice(loader(resumed), 4)] == full
    with pytest.raises(ValueError, match="needs sources"):
        ShardStream(tmp_path, mix="balanced", batch_size=2)


def test_a_sharded_source_is_checked_against_the_json_files_of_its_objective(tmp_path):
    """Stage 3's shard set is written from the two instruction files, stages 1 and 2's from
    ``<name>.json``: the path check asks for those, naming each one missing."""
    from datamodules.shard_datamodule import shard_path_errors
    from nextgpt.data_source import DataSource

    root = tmp_path / "src"
    root.mkdir()
    src = DataSource(name="s", modality="image", root=str(root))

    def errors(objective: str) -> list[str]:
        return shard_path_errors("d", [src], objective, str(tmp_path / "shards"), "rewrite")

    (root / "s.json").write_text("[]")
    assert errors("caption") == []
    (only,) = errors("instruct")
    assert (
        "s_comprehension.json" in only and "s_generation.json" in only and "dataset.sources[0].root" in only
    )
    for name in ("s_comprehension.json", "s_generation.json"):
        (root / name).write_text("[]")
    (root / "s.json").unlink()
    assert errors("instruct") == []
    (only,) = errors("generate")
    assert f"{root / 's.json'} does not exist" in only
