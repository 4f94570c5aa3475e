"""Distributed training pieces the strategy configs and the stages use.

``strategy=fsdp`` is FSDP2 (``torch.distributed.fsdp.fully_shard``) through Lightning's
``ModelParallelStrategy``, chosen over Lightning's FSDP1 ``FSDPStrategy`` because NExT-GPT mixes
frozen and trainable weights in every block:

- FSDP2 shards each parameter on its own (a ``DTensor``). Frozen and trainable weights of one
  unit stay separate: gradients and optimizer state exist for the trainable ones only, and a
  bundle gathers exactly the trainable tensors (``full_tensor`` per parameter). FSDP1 flattens a
  unit's weights into one ``FlatParameter``, so a LoRA unit carries a gradient buffer the size
  of the whole frozen layer, and the only way to read a trainable tensor is to gather its unit.
- It runs on CPU with gloo as well as on GPUs, so the sharded path is tested here; Lightning's
  FSDP1 strategy refuses to run without CUDA.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.load import _METADATA_FILENAME
from lightning.pytorch.strategies import DeepSpeedStrategy, ModelParallelStrategy
from torch import nn
from torch.distributed.checkpoint import FileSystemReader, load
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from nextgpt.checkpointing import outermost_by_class_suffix
from nextgpt.safeload import check_checkpoint_folder, load_checkpoint


class WrapByClassName:
    """Which modules become their own FSDP unit: those whose class name ends with a suffix.

    Any Hugging Face causal LM names its blocks ``*DecoderLayer``, so the policy needs no import
    of a model-specific class and works for Llama, Mistral, Qwen and the rest.
    """

    def __init__(self, suffixes: Iterable[str] = ("DecoderLayer",)):
        self.suffixes = tuple(suffixes)
        if not self.suffixes:
            raise ValueError("the wrap policy needs at least one class-name suffix")

    def units(self, model: nn.Module) -> list[str]:
        """Names of the modules to shard as units of their own (outermost matches only)."""
        return outermost_by_class_suffix(model, self.suffixes)


def shard_model(
    model: nn.Module,
    mesh,
    policy: WrapByClassName,
    *,
    reshard_after_forward: bool = True,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = None,
) -> list[str]:
    """``fully_shard`` each unit the policy names, then the root (which holds everything else:
    the encoder, the projectors, the new-token table). Returns the unit names."""
    kwargs: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if param_dtype is not None or reduce_dtype is not None:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    units = policy.units(model)
    if not units:
        raise ValueError(
            f"the FSDP wrap policy {policy.suffixes} matches no module of the model "
            "(set sharding.wrap to class-name suffixes of its blocks)"
        )
    for name in units:
        fully_shard(model.get_submodule(name), **kwargs)
    fully_shard(model, **kwargs)
    return units


def is_sharded(strategy: Any) -> bool:
    """Parameters live in shards (FSDP2, ZeRO-3): reading one whole is a collective."""
    return isinstance(strategy, ModelParallelStrategy) or (
        isinstance(strategy, DeepSpeedStrategy) and getattr(strategy, "zero_stage_3", False)
    )


class FSDP2Strategy(ModelParallelStrategy):
    """Pure data parallel FSDP2: every process holds one shard (no tensor parallelism).

    The stage module shards itself in ``configure_model`` (``shard_model``, with the policy of the
    ``sharding`` config). Checkpoints are distributed (each rank writes its shards) and hold the
    trainable tensors and their optimizer state only; resuming loads exactly those.
    """

    def __init__(self, save_distributed_checkpoint: bool = True, **kwargs: Any):
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            **kwargs,
        )

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        # NextGPT's output carries views (the last hidden state, logit slices) that nothing modifies
        # in place, which is the only case the warning is about
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
        super().setup_environment()

    def lightning_module_state_dict(self) -> dict[str, Any]:
        keep = set(getattr(self.lightning_module, "checkpoint_keys", lambda: ())())
        assert self.model is not None, "Lightning connects the model before it saves a checkpoint"
        state = self.model.state_dict()
        return {k: v for k, v in state.items() if k in keep} if keep else state

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        path = Path(self.broadcast(checkpoint_path))
        if not path.is_dir():
            return super().load_checkpoint(checkpoint_path, weights_only=True)
        check_checkpoint_folder(path)  # torch.distributed.checkpoint unpickles .metadata freely
        saved = set(FileSystemReader(str(path)).read_metadata().state_dict_metadata)
        module = self.model
        assert module is not None, "Lightning connects the model before it loads a checkpoint"
        wanted = {k: v for k, v in module.state_dict().items() if f"state_dict.{k}" in saved}
        missing = sorted(set(getattr(self.lightning_module, "checkpoint_keys", lambda: ())()) - set(wanted))
        if missing:
            raise RuntimeError(f"checkpoint {path} lacks trainable tensors {missing[:5]} of this model")
        state = {"state_dict": wanted}
        load(state, checkpoint_id=path)
        set_model_state_dict(module, state["state_dict"], options=StateDictOptions(strict=False))
        for i, optimizer in enumerate(self.optimizers):
            key = f"optimizer_{i}"
            optim_state = {key: get_optimizer_state_dict(module, optimizer)}
            load(optim_state, checkpoint_id=path)
            set_optimizer_state_dict(
                module,
                optimizer,
                optim_state_dict=optim_state[key],
                options=StateDictOptions(cpu_offload=True),
            )
        return load_checkpoint(path / _METADATA_FILENAME)
