"""Reading checkpoints never runs code (nextgpt.safeload): Lightning files, a distributed
checkpoint's .metadata and DeepSpeed's .pt files are read with an allow-list, and a file that
asks for anything else is refused by name before any of it runs."""

from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from nextgpt.safeload import UnsafeFileError, check_checkpoint_folder, check_dcp_metadata, load_checkpoint


class Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_lightning_checkpoint_loads_and_a_hostile_one_is_refused_by_name(tmp_path):
    good = tmp_path / "good.ckpt"
    torch.save(
        {"global_step": 3, "state_dict": {"w": torch.ones(2)}, "loops": {"fit_loop": {"epoch": 1}}}, good
    )
    assert load_checkpoint(good)["global_step"] == 3
    marker, bad = tmp_path / "PWNED", tmp_path / "bad.ckpt"
    torch.save({"global_step": 3, "x": Payload(marker)}, bad)
    with pytest.raises(UnsafeFileError, match="bad.ckpt was refused: reading it needs arbitrary unpickling"):
        load_checkpoint(bad)
    assert not marker.exists()


def test_a_damaged_file_is_not_called_unsafe(tmp_path):
    good = tmp_path / "good.ckpt"
    torch.save({"global_step": 3}, good)
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(good.read_bytes()[:100])
    with pytest.raises(Exception) as e:
        load_checkpoint(cut)
    assert not isinstance(e.value, UnsafeFileError)


def test_a_distributed_checkpoints_metadata_is_checked_before_torch_unpickles_it(tmp_path):
    state = {
        "state_dict": {"a": torch.randn(3, 4, dtype=torch.bfloat16), "b": torch.zeros(2)},
        "optimizer_0": {
            "state": {"a": {"step": torch.tensor(1.0)}},
            "param_groups": [{"lr": 0.1, "params": ["a"]}],
        },
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no process group: one process saves alone
        dcp.save(state, checkpoint_id=str(tmp_path / "ckpt"))
    torch.save({"global_step": 5}, tmp_path / "ckpt" / "meta.pt")
    check_checkpoint_folder(tmp_path / "ckpt")  # what torch and Lightning write passes

    marker = tmp_path / "PWNED"
    (tmp_path / "ckpt" / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(
        UnsafeFileError, match=r"\.metadata was refused.*posix\.system|\.metadata was refused.*os\.system"
    ):
        check_dcp_metadata(tmp_path / "ckpt" / ".metadata")
    with pytest.raises(UnsafeFileError):
        check_checkpoint_folder(tmp_path / "ckpt")
    assert not marker.exists()


def test_a_deepspeed_folder_passes_with_its_own_classes_and_fails_with_others(tmp_path):
    loss_scaler = pytest.importorskip("deepspeed.runtime.fp16.loss_scaler")
    zero_config = pytest.importorskip("deepspeed.runtime.zero.config")
    folder = tmp_path / "last.ckpt" / "checkpoint"
    folder.mkdir(parents=True)
    torch.save(
        {"module": {"w": torch.ones(2)}, "ds_version": "0.19", "global_steps": 4},
        folder / "mp_rank_00_model_states.pt",
    )
    torch.save(
        {
            "optimizer_state_dict": {
                "zero_stage": zero_config.ZeroStageEnum.gradients,
                "loss_scaler": loss_scaler.DynamicLossScaler(2.0**16, 1000, 1.0, 2, False),
            }
        },
        folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt",
    )
    check_checkpoint_folder(tmp_path / "last.ckpt")
    marker = tmp_path / "PWNED"
    torch.save({"module": {}, "extra": Payload(marker)}, folder / "mp_rank_01_model_states.pt")
    with pytest.raises(UnsafeFileError, match="mp_rank_01_model_states.pt"):
        check_checkpoint_folder(tmp_path / "last.ckpt")
    assert not marker.exists()
