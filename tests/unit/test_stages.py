"""Each stage trains exactly its group: names asserted, one step changes exactly those tensors,
and the loss on a fixed batch falls by at least 30% within a few dozen steps."""

from __future__ import annotations

import random

import pytest
import torch
from omegaconf import OmegaConf

from datamodules.nextgpt_layout import read_source
from nextgpt.batch import Collator, ConversationDataset
from nextgpt.stages import STAGES

LAYERS = (0, 1)  # the tiny LLM's decoder layers
LORA = {
    f"llm.base_model.model.model.layers.{i}.self_attn.{m}_proj.lora_{ab}.default.weight"
    for i in LAYERS
    for m in "qkvo"
    for ab in "AB"
}
MARKERS = {"new_tokens.markers.embed", "new_tokens.markers.head"}
SIGNALS = {"new_tokens.signals.embed", "new_tokens.signals.head"}
INPUT_PROJ = {"input_projector.proj.weight", "input_projector.proj.bias"}


def output_projector_names(model) -> set[str]:
    names = {n for n, _ in model.named_parameters() if n.startswith("output_projectors.")}
    assert {n.split(".")[1] for n in names} == {"image", "audio", "video"}
    assert "output_projectors.image.queries" in names and "output_projectors.audio.out_fc.weight" in names
    return names


def build_stage(cfg):
    cls = STAGES[int(cfg.stage.number)]
    module = cls(
        model=OmegaConf.to_container(cfg.model, resolve=True),
        optim=OmegaConf.to_container(cfg.stage.optim, resolve=True),
        loss=OmegaConf.to_container(cfg.stage.loss),
    )
    module.configure_model()
    return module


def fixed_batch(cfg, module, per_modality: int = 2):
    """A batch holding every modality (inputs and outputs), so every projector is exercised."""
    rng = random.Random(0)
    convs = []
    for src in cfg.dataset.sources:
        found, _ = read_source(src.name, src.modality, src.root, cfg.stage.objective)
        ins = [c for c in found if c.media_in]
        outs = [c for c in found if c.captions_out]
        for group in (ins, outs):
            convs += rng.sample(group, min(per_modality, len(group)))
    ds = ConversationDataset(
        convs,
        module.tokenizer,
        module.model.layout,
        cfg.dataset.template,
        int(cfg.model.input_projector.num_tokens),
        512,
    )
    return Collator(module.tokenizer.pad_token_id, ds.num_media_tokens)([ds[i] for i in range(len(ds))])


@pytest.fixture(params=[1, 2, 3], ids=lambda s: f"stage{s}")
def stage_setup(request, tiny_config):
    cfg = tiny_config(f"stage={request.param}")
    module = build_stage(cfg)
    return request.param, cfg, module, fixed_batch(cfg, module)


def test_exact_trainable_names(stage_setup):
    stage, cfg, module, _ = stage_setup
    model = module.model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {
        1: INPUT_PROJ | MARKERS,
        2: SIGNALS | output_projector_names(model),
        3: LORA | INPUT_PROJ | MARKERS | SIGNALS | output_projector_names(model),
    }[stage]
    assert trainable == expected
    assert not any(n.startswith(("llm.", "encoder.")) and ".lora_" not in n for n in trainable)


def test_one_step_changes_exactly_the_trainable_tensors(stage_setup):
    stage, cfg, module, batch = stage_setup
    model = module.model
    with torch.no_grad():  # LoRA starts with B = 0, which zeroes A's first gradient by design:
        for n, p in model.named_parameters():  # start from a state "after the first step"
            if ".lora_B." in n:
                p.normal_(0, 0.01)
    before = {n: t.detach().clone() for n, t in model.state_dict().items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    # no weight decay: every change must come from a gradient
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    model.train()
    loss = module.compute_loss(batch)["loss"]
    loss.backward()
    no_grad = sorted(
        n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())
    )
    assert not no_grad, f"trainable tensors without gradient: {no_grad}"
    opt.step()
    after = model.state_dict()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed == trainable


def test_loss_falls_on_a_fixed_batch(stage_setup):
    stage, cfg, module, batch = stage_setup
    model = module.model
    torch.manual_seed(0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(40):
        loss = module.compute_loss(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert min(losses[-5:]) <= 0.7 * losses[0], f"stage {stage}: loss {losses[0]:.3f} -> {losses[-1]:.3f}"
