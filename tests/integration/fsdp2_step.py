"""One optimizer step of the real tiny NextGPT stage, sharded with torch's FSDP2 or not.

``torchrun --nproc-per-node 2 tests/integration/fsdp2_step.py STAGE OUT CACHE`` shards the model over
the processes with ``fully_shard`` and the wrap policy of ``configs/strategy/fsdp.yaml``, gives each
rank its half of a fixed batch, takes one AdamW step and gathers the trainable tensors; run as one
plain process it takes the same step on the whole batch. Rank 0 writes the trainable tensors and
what it saw of the sharding to ``OUT`` (a ``torch.save`` file) for the test to compare.
"""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def fixed_conversations(cfg, per_modality: int = 2):
    """Conversations with every modality in and out, a fixed choice: the same on every rank."""
    from datamodules.nextgpt_layout import read_source

    rng = random.Random(0)
    convs = []
    for src in cfg.dataset.sources:
        found, _ = read_source(src.name, src.modality, src.root, cfg.stage.objective)
        for group in ([c for c in found if c.media_in], [c for c in found if c.captions_out]):
            convs += rng.sample(group, min(per_modality, len(group)))
    return convs


def main(stage: int, out: Path, cache: Path) -> None:
    from omegaconf import OmegaConf

    from nextgpt.batch import collate_conversations
    from nextgpt.bundles import bundle_state_dict
    from nextgpt.config import compose
    from nextgpt.losses import count_keys
    from nextgpt.stages import STAGES
    from nextgpt.strategies import WrapByClassName, shard_model

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        dist.init_process_group("gloo")
    torch.manual_seed(0)
    cfg = compose(
        [
            f"stage={stage}",
            "strategy=fsdp",
            f"paths.cache_dir={cache}",
            f"paths.root={out.parent}",
            "model.output_projector.dropout=0",
            "model.lora.dropout=0",
        ],
        output_dir=str(out.parent),
    )
    module = STAGES[stage](
        model=OmegaConf.to_container(cfg.model, resolve=True),
        optim=OmegaConf.to_container(cfg.stage.optim, resolve=True),
        loss=OmegaConf.to_container(cfg.stage.loss, resolve=True),
    )
    module.configure_model()  # no trainer: built whole, then sharded below by the config's policy
    model = module.model
    with torch.no_grad():  # LoRA's B starts at 0, which zeroes A's first gradient
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))) * 0.01)
    convs = fixed_conversations(cfg)
    mine = convs[rank::world]
    batch = collate_conversations(
        mine,
        module.tokenizer,
        model.layout,
        cfg.dataset.template,
        num_media_tokens=int(cfg.model.input_projector.num_tokens),
        max_length=512,
    )
    info: dict = {"world": world, "units": []}
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import DTensor

        info["units"] = shard_model(
            model, init_device_mesh("cpu", (world,)), WrapByClassName(cfg.sharding.wrap)
        )
        frozen = [p for p in model.parameters() if not p.requires_grad]
        info["frozen_sharded"] = all(isinstance(p, DTensor) for p in frozen)
        info["frozen_local_fraction"] = sum(p.to_local().numel() for p in frozen) / sum(
            p.numel() for p in frozen
        )
    # the step's counts: this rank's, summed over the ranks
    keys = count_keys(model.modality_names)
    counts = torch.tensor([float(batch["counts"].get(k, 0)) for k in keys], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(counts)
    trainable = [p for p in model.parameters() if p.requires_grad]
    # eps well above float noise: Adam's first step is lr * g / (|g| + eps), which for eps ~ 1e-8
    # turns a gradient of 1e-9 +- rounding into +-lr; with 1e-3 the step is smooth in the gradient
    opt = torch.optim.AdamW(trainable, lr=1e-3, weight_decay=0.0, eps=1e-3)
    model.train()
    loss = module.loss_terms(batch, dict(zip(keys, counts.tolist(), strict=False)))["loss"]
    (loss * world).backward()  # FSDP averages the gradients over the ranks; the loss is already global
    from nextgpt.gather import full_tensor

    grads = {n: full_tensor(p.grad) for n, p in model.named_parameters() if p.requires_grad}
    opt.step()
    info["optimizer_tensors"] = sum(len(g["params"]) for g in opt.param_groups)
    info["trainable_tensors"] = len(trainable)
    info["optimizer_state_tensors"] = len(opt.state)
    state = bundle_state_dict(model, module.trainable_names)  # every rank gathers; rank 0 writes
    if rank == 0:
        torch.save({"state": state, "grads": grads, "info": info}, out)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
