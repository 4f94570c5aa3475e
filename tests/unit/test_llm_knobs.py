"""The LLM knobs as keys: activation checkpointing of the decoder layers (the same loss and
gradients, less memory kept after the forward pass, measured) and the attention implementation."""

from __future__ import annotations

import pytest
import torch

from nextgpt.checkpointing import checkpoint_decoder_layers, decoder_layers, memory_kept_by
from nextgpt.model_spec import ModelSpec, OutputProjectorSpec
from tests.unit.test_stages import build_stage, fixed_batch


def stage_step(tiny_config, stage: int, *overrides: str, train: bool = True):
    """One stage built with ``overrides`` (dropout off), its loss terms on the fixed batch (after a
    warm-up pass), the memory that forward kept, and the trainable gradients: (module, terms, kept, grads)."""
    cfg = tiny_config(
        f"stage={stage}", *overrides, "model.lora.dropout=0.0", "model.output_projector.dropout=0.0"
    )
    torch.manual_seed(0)
    module = build_stage(cfg)
    module.model.train(train)
    batch = fixed_batch(cfg, module)
    module.compute_loss(batch)  # warm-up: lazily built buffers are not what a pass keeps
    terms, kept = memory_kept_by(lambda: module.compute_loss(batch))
    terms["loss"].backward()
    grads = {n: p.grad.clone() for n, p in module.model.named_parameters() if p.requires_grad}
    return module, {k: float(v.detach()) for k, v in terms.items()}, kept, grads


@pytest.mark.parametrize("stage", [1, 3])
def test_checkpointing_gives_the_same_loss_and_gradients(stage, tiny_config):
    results = []
    for ckpt in (False, True):
        module, terms, _, grads = stage_step(
            tiny_config, stage, f"model.llm.activation_checkpointing={str(ckpt).lower()}"
        )
        results.append((terms["loss"], grads))
        assert all(
            getattr(module.model.llm.get_submodule(n), "_nextgpt_checkpointed", False) == ckpt
            for n in decoder_layers(module.model.llm)
        )
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-5, atol=1e-7, msg=name)


def test_checkpointing_keeps_less_memory_after_the_forward():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
    )
    llm = LlamaForCausalLM(config).eval().requires_grad_(False)
    x = torch.randn(4, 256, 256, requires_grad=True)
    forward = lambda: llm(inputs_embeds=x, use_cache=False).logits.float().logsumexp(-1).mean()  # noqa: E731
    plain, kept_plain = memory_kept_by(forward)
    if kept_plain is None:
        pytest.skip("glibc mallinfo2 is not available to measure memory")
    grad_plain = torch.autograd.grad(plain, x)[0]
    assert checkpoint_decoder_layers(llm) == [f"model.layers.{i}" for i in range(4)]
    ckpt, kept_ckpt = memory_kept_by(forward)
    grad_ckpt = torch.autograd.grad(ckpt, x)[0]
    torch.testing.assert_close(grad_plain, grad_ckpt)
    assert kept_ckpt < kept_plain / 3, (kept_plain, kept_ckpt)
    with torch.no_grad():  # without gradients the layers run as they are
        assert torch.equal(
            llm(inputs_embeds=x, use_cache=False).logits, llm(inputs_embeds=x, use_cache=False).logits
        )


def test_a_model_without_decoder_layers_is_refused():
    with pytest.raises(ValueError, match="activation_checkpointing=true: Sequential has no module"):
        checkpoint_decoder_layers(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_attention_implementation_reaches_the_llm(tiny_config):
    from nextgpt.config import ConfigError
    from nextgpt.model import build_nextgpt
    from nextgpt.schema import validate

    cfg = tiny_config("stage=1", "model.llm.attn_implementation=eager")
    model, _, _ = build_nextgpt(ModelSpec.from_config(cfg.model))
    assert model.llm.config._attn_implementation == "eager"
    with pytest.raises(ConfigError, match=r"model.llm.attn_implementation='flashy': must be one of"):
        validate(tiny_config("stage=1", "model.llm.attn_implementation=flashy"))
    with pytest.raises(ConfigError, match="model.llm.activation_checkpointing='yes': must be true or false"):
        validate(tiny_config("stage=1", "model.llm.activation_checkpointing=yes"))


@pytest.mark.parametrize("stage", [1, 3])
def test_chunked_logits_give_the_same_loss_and_gradients_with_less_memory(stage, tiny_config):
    results = [
        stage_step(tiny_config, stage, f"stage.loss.logits_chunk={chunk}")[1:] for chunk in ("null", "7")
    ]
    (full, kept_full, grads_full), (chunked, kept_chunked, grads_chunked) = results
    assert full == pytest.approx(chunked, rel=1e-5)
    for name in grads_full:
        torch.testing.assert_close(grads_chunked[name], grads_full[name], rtol=1e-4, atol=1e-6, msg=name)
    if kept_full is not None:
        assert kept_chunked < kept_full, (kept_full, kept_chunked)


def test_chunked_head_logits_equal_the_llms_own_with_softcapping(tmp_path):
    from transformers import AutoModelForCausalLM

    from nextgpt.model import NextGPT
    from nextgpt.tiny.families import build_tiny_family
    from nextgpt.tokens import TokenLayout

    path = build_tiny_family("gemma2", tmp_path / "gemma2")
    llm = AutoModelForCausalLM.from_pretrained(path).eval()
    assert llm.config.final_logit_softcapping
    first = llm.config.vocab_size
    layout = TokenLayout(
        first, ("<Img>", "</Img>"), ("[IMG0]",), {"image": (first, first + 1)}, {"image": (first + 2,)}
    )

    class NoEncoder(torch.nn.Module):
        embed_dim = 8

    model = NextGPT(
        llm, NoEncoder(), layout, num_media_tokens=1, output_shapes={}, output_projector=OutputProjectorSpec()
    )
    ids = torch.randint(0, first, (2, 9))
    out = model.llm(input_ids=ids, output_hidden_states=True)
    torch.testing.assert_close(model.head_logits(out.hidden_states[-1])[..., :first], out.logits[..., :first])


def test_compiled_decoder_layers_give_the_same_loss(tiny_config):
    losses = []
    for compiled in ("false", "true"):
        module, terms, _, grads = stage_step(
            tiny_config,
            1,
            f"model.llm.compile={compiled}",
            "model.llm.compile_backend=aot_eager",
            train=False,
        )
        losses.append((terms["loss"], grads["input_projector.proj.weight"]))
        layers = [module.model.llm.get_submodule(n) for n in decoder_layers(module.model.llm)]
        assert all(
            (getattr(m, "_compiled_call_impl", None) is not None) == (compiled == "true") for m in layers
        )
    (a, ga), (b, gb) = losses
    assert a == pytest.approx(b, rel=1e-5)
    torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-6)
