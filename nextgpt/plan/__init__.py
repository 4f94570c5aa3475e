"""A memory and time plan of a training run, before any weight loads.

The whole model is built on the meta device from the backbones' own configs (:mod:`nextgpt.plan.meta`;
the published ones in :mod:`nextgpt.plan.cards` where a folder is absent), LoRA applied and the stage's groups made
trainable, exactly as a run does; parameter counts and dtypes are read off that model, not typed
in. From them and the strategy, the per-rank memory is split into frozen weights, trainable weights,
gradients, optimizer state, the decoders' text encoders (and denoisers), activations and logits.

Activations (bytes per token, per decoder layer, the LLM frozen; ``a`` the activation dtype's size):
each RMSNorm keeps its fp32 input (4h, two per layer); fused attention (SDPA / flash) keeps q, the
expanded k and v and its output (4h·a), eager attention also its fp32 softmax and the probabilities
((4 + a)·heads·s); the SwiGLU MLP keeps gate, silu(gate) and up (3i·a); frozen linear layers keep
nothing (their weight gradient is not needed); each LoRA-adapted linear keeps its fp32 input and a
dropout mask (5·d_in). For the loss the fp32 log-probabilities are kept (4·V); when the backward
pass starts, their gradient and the logits' are alive beside them (8·V more). With activation checkpointing each
layer keeps its input (h·a) and one layer is recomputed at a time. Checked against the memory a
forward pass keeps, measured on the CPU (``tests/unit/test_plan.py``).

Time: 2N FLOPs per token forward and 2N backward (to the activations only; the LLM is frozen),
plus LoRA's weight gradients and causal attention (6·L·s·h per token), one more forward with
checkpointing; tokens/s = MFU x peak FLOP/s x ranks / FLOPs per token, for a stated MFU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PretrainedConfig

from nextgpt.checkpointing import decoder_layers
from nextgpt.model import torch_dtype
from nextgpt.plan import cards
from nextgpt.plan.meta import denoiser_params, meta_model
from nextgpt.spec import RunSpec

GIB = 2**30
# MFU measured with random weights at real shapes on one H100 (bf16, eager PyTorch + SDPA): 7B stage 1
# at batch 18 x 512 and stage 3 (LoRA r32) at batch 4 x 512; stage 2 is taken as stage 1
MEASURED_MFU = {1: 0.40, 2: 0.40, 3: 0.25}
STRATEGIES = ("ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero2_offload", "deepspeed_zero3")


# --- the plan -------------------------------------------------------------------------------------
@dataclass
class Plan:
    stage: int
    strategy: str
    world_size: int
    batch_size: int
    seq_len: int
    parts: dict[str, float] = field(default_factory=dict)  # per-rank bytes on the device
    host: dict[str, float] = field(default_factory=dict)  # per-rank bytes in host memory (offload)
    activations_checkpointed: float = 0.0  # the activation part with model.llm.activation_checkpointing
    checkpointing: bool = False
    params: dict[str, int] = field(default_factory=dict)
    flops_per_token: float = 0.0
    tokens_per_s: float = 0.0
    mfu: float = 0.0
    peak_tflops: float = 0.0
    device: str = ""
    sources: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    def total_with(self, checkpointing: bool) -> float:
        other = (
            self.activations_checkpointed
            if checkpointing != self.checkpointing
            else self.parts["activations"]
        )
        return self.total - self.parts["activations"] + other

    def table(self) -> str:
        ck = "on" if self.checkpointing else "off"
        lines = [
            f"memory plan: stage {self.stage}, {self.strategy} x {self.world_size} ranks, batch {self.batch_size} "
            f"x {self.seq_len} tokens per rank, activation checkpointing {ck}",
            f"  params: {self.params['trainable']:,} trainable, {self.params['frozen']:,} frozen "
            f"(LLM {self.params['llm']:,}; from {', '.join(self.sources)})",
        ]
        lines += [f"  {k:38s} {_size(v)}" for k, v in self.parts.items()]
        lines.append(
            f"  {'total per rank':38s} {_size(self.total)}   (activation checkpointing "
            f"{'off' if self.checkpointing else 'on'}: {_size(self.total_with(not self.checkpointing)).strip()})"
        )
        for k, v in self.host.items():
            lines.append(f"  {k + ' (host memory)':38s} {_size(v)}")
        lines.append(
            f"  time: {self.flops_per_token / 1e9:.1f} GFLOP per token; at MFU {self.mfu:.0%} of "
            f"{self.peak_tflops:g} TFLOP/s ({self.device}): {self.tokens_per_s:,.0f} tokens/s over "
            f"{self.world_size} ranks"
        )
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {
            "stage": self.stage,
            "strategy": self.strategy,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "checkpointing": self.checkpointing,
            "gib": {k: v / GIB for k, v in self.parts.items()},
            "host_gib": {k: v / GIB for k, v in self.host.items()},
            "total_gib": self.total / GIB,
            "total_other_checkpointing_gib": self.total_with(not self.checkpointing) / GIB,
            "params": self.params,
            "tokens_per_s": self.tokens_per_s,
            "flops_per_token": self.flops_per_token,
        }


def _size(n: float) -> str:
    return f"{n / GIB:9.2f} GiB" if n >= 0.1 * GIB else f"{n / 2**20:9.2f} MiB"


def activation_bytes(
    llm_config: PretrainedConfig,
    tokens: int,
    seq: int,
    *,
    act_bytes: int,
    attn: str,
    lora_inputs: int = 0,
    checkpointing: bool = False,
    logits_chunk: int | None = None,
) -> tuple[float, float, float]:
    """Bytes for ``tokens`` tokens of length ``seq``: (kept by the decoder layers, kept for the loss,
    the transient peak on top at the start of the backward pass)."""
    h, layers, heads = llm_config.hidden_size, llm_config.num_hidden_layers, llm_config.num_attention_heads
    i = (
        getattr(llm_config, "intermediate_size", None) or getattr(llm_config, "n_inner", None) or 4 * h
    )  # GPT-2: n_inner
    per_layer = 8 * h + 4 * h * act_bytes + 3 * i * act_bytes + 5 * lora_inputs
    if attn == "eager":
        per_layer += (4 + act_bytes) * heads * seq
    vocab = llm_config.vocab_size
    # kept: the fp32 log-probabilities, the final norm's fp32 input and the hidden states the
    # new-token head reads; at the loss's backward the log-probabilities' gradient and the logits'
    # are alive beside them (8·V more), and with checkpointing one layer is recomputed at a time
    loss = 4 * vocab + 4 * h + act_bytes * h
    peak = max(8 * vocab, per_layer if checkpointing else 0)
    kept = layers * h * act_bytes if checkpointing else layers * per_layer
    if logits_chunk:  # stage.loss.logits_chunk: one chunk's logits at a time, recomputed in backward
        return (
            tokens * kept,
            tokens * (4 * h + act_bytes * h) + min(logits_chunk, tokens) * 12 * vocab,
            tokens * (per_layer if checkpointing else 0),
        )
    return tokens * kept, tokens * loss, tokens * peak


def _lora_inputs(model) -> int:
    """Sum of the input widths of the LoRA-adapted linear layers of one decoder layer."""
    first = next(iter(decoder_layers(model.llm)), None)
    if first is None:
        return 0
    return int(
        sum(
            getattr(m, "in_features", 0)
            for m in model.llm.get_submodule(first).modules()
            if hasattr(m, "lora_A")
        )
    )


def strategy_name(strategy: Any) -> str:
    """The plan's name of ``trainer.strategy`` (a name, or a strategy's config with ``_target_``)."""
    target = str(strategy.get("_target_", "")) if hasattr(strategy, "get") else str(strategy)
    if "DeepSpeed" in target:
        stage = int(strategy.get("stage", 2))
        return (
            "deepspeed_zero3"
            if stage == 3
            else ("deepspeed_zero2_offload" if strategy.get("offload_optimizer") else "deepspeed_zero2")
        )
    if "FSDP" in target or "ModelParallel" in target:
        return "fsdp"
    return "ddp"


@dataclass(frozen=True)
class PlanSettings:
    """What the plan reads of a run besides its :class:`~nextgpt.spec.RunSpec`: the trainer's
    strategy and precision, the sequence length, and the ``plan.*`` keys."""

    strategy: str  # strategy_name()
    precision: str  # trainer.precision
    seq_len: int  # plan.seq_len, else dataset.max_length
    mfu: float | None = None  # plan.mfu (None: MEASURED_MFU of the stage)
    peak_tflops: float | None = None  # plan.peak_tflops (None: the device's card)
    device_memory_gib: float | None = None  # plan.device_memory_gib (None: the device's)
    check: bool = True  # plan.check: train.py prints the plan and refuses one that does not fit
    allow_over_memory: bool = False  # plan.allow_over_memory

    @classmethod
    def of(cls, node: Any) -> PlanSettings:
        """The settings of a composed training config."""
        plan = node.get("plan") or {}
        return cls(
            strategy=strategy_name(node.trainer.strategy),
            precision=str(node.trainer.get("precision", "32-true")),
            seq_len=int(plan.get("seq_len") or node.dataset.max_length),
            mfu=float(plan["mfu"]) if plan.get("mfu") else None,
            peak_tflops=float(plan["peak_tflops"]) if plan.get("peak_tflops") else None,
            device_memory_gib=float(plan["device_memory_gib"]) if plan.get("device_memory_gib") else None,
            check=bool(plan.get("check", True)),
            allow_over_memory=bool(plan.get("allow_over_memory", False)),
        )


def device_figures(settings: PlanSettings) -> tuple[str, float, float | None]:
    """(device name, bf16 TFLOP/s, memory GiB or None) from ``plan.*`` keys, else the CUDA device."""
    name, tflops, mem = cards.REFERENCE_DEVICE[0] + " (assumed)", cards.REFERENCE_DEVICE[1], None
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        mem = torch.cuda.get_device_properties(0).total_memory / GIB
        tflops = next((v for k, v in cards.PEAK_TFLOPS.items() if k in name), tflops)
    if settings.peak_tflops:
        tflops = settings.peak_tflops
    if settings.device_memory_gib:
        mem = settings.device_memory_gib
    return name, tflops, mem


def make_plan(
    spec: RunSpec, settings: PlanSettings, world_size: int | None = None, built: tuple | None = None
) -> Plan:
    """The plan of the run ``spec`` on ``world_size`` ranks (default: trainer.devices x
    trainer.num_nodes). ``built``: :func:`meta_model`'s result for this model and stage, to plan
    several strategies without building it again."""
    stage = spec.stage.number
    batch = spec.batch
    world = int(world_size or batch.devices * batch.num_nodes)
    model_spec = spec.model
    model, llm_config, source, text_encoders = built or meta_model(model_spec, stage)
    seq = settings.seq_len
    b = int(batch.per_device)
    strategy = settings.strategy
    ckpt = model_spec.llm.activation_checkpointing
    nbytes = lambda ps: float(sum(p.numel() * p.element_size() for p in ps))  # noqa: E731
    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen_llm = [p for n, p in model.named_parameters() if not p.requires_grad and n.startswith("llm.")]
    frozen_enc = [p for n, p in model.named_parameters() if not p.requires_grad and n.startswith("encoder.")]
    frozen_other = [
        p
        for n, p in model.named_parameters()
        if not p.requires_grad and not n.startswith(("llm.", "encoder."))
    ]
    n_train = sum(p.numel() for p in trainable)
    half = "deepspeed" in strategy and "bf16" in settings.precision

    w_train = (
        nbytes(trainable) if not half else 2.0 * n_train
    )  # DeepSpeed keeps bf16 weights, fp32 masters aside
    grads = w_train
    optim = 8.0 * n_train + (
        4.0 * n_train if half else 0.0
    )  # AdamW's two moments (+ DeepSpeed's fp32 masters)
    frozen = {
        "frozen weights: LLM": nbytes(frozen_llm),
        "frozen weights: ImageBind": nbytes(frozen_enc),
        "frozen weights: other stages' parts": nbytes(frozen_other),
    }  # projectors / rows this stage keeps
    parts: dict[str, float] = {}
    host: dict[str, float] = {}
    shard = lambda x: x / world  # noqa: E731
    largest_layer = max(
        (nbytes(model.llm.get_submodule(n).parameters()) for n in decoder_layers(model.llm)), default=0.0
    )
    if strategy == "ddp":
        parts.update(frozen)
        parts.update(
            {"trainable weights": w_train, "gradients (+ DDP buckets)": 2 * grads, "optimizer state": optim}
        )
    elif strategy == "fsdp":
        parts.update({k: shard(v) for k, v in frozen.items()})
        parts.update(
            {
                "trainable weights": shard(w_train),
                "gradients": shard(grads),
                "optimizer state": shard(optim),
                "gathered layers (2 in flight)": 2 * largest_layer if world > 1 else 0.0,
            }
        )
    else:
        zero3 = strategy == "deepspeed_zero3"
        parts.update({k: shard(v) if zero3 else v for k, v in frozen.items()})
        parts["trainable weights"] = shard(w_train) if zero3 else w_train
        bucket = min(grads, 2e8 * 2)  # Lightning's reduce bucket: 2e8 elements in bf16
        parts["gradients"] = shard(4.0 * n_train) + bucket  # the rank's fp32 partition + the reduce bucket
        if strategy == "deepspeed_zero2_offload":
            parts["gradients"] = bucket
            host["optimizer state + fp32 gradients"] = shard(optim + 4.0 * n_train)
            parts["optimizer state"] = 0.0
        else:
            parts["optimizer state"] = shard(optim)
        if zero3:
            parts["gathered layers (prefetch)"] = 2 * largest_layer if world > 1 else 0.0
    aligns = stage in (2, 3)
    enc_bytes = sum(
        sum(p.numel() for p in enc.parameters()) * 4.0 for encs in text_encoders.values() for enc in encs
    )
    parts["decoder text encoders (fp32)"] = enc_bytes if aligns else 0.0
    if aligns and spec.stage.loss.denoise > 0:
        parts["denoisers (UNet + VAE)"] = sum(
            denoiser_params(Path(dec.path)) * torch.empty((), dtype=torch_dtype(dec.dtype)).element_size()
            for dec in model_spec.generated.values()
            if dec.denoise
        )
    precision = settings.precision
    act_bytes = 2 if ("16" in precision or model_spec.llm.dtype in ("bfloat16", "float16")) else 4
    attn = str(
        model_spec.llm.attn_implementation or getattr(llm_config, "_attn_implementation", None) or "sdpa"
    )
    lora_in = _lora_inputs(model) if stage == 3 else 0
    chunk = spec.stage.loss.logits_chunk
    layers, loss, peak = activation_bytes(
        llm_config,
        b * seq,
        seq,
        act_bytes=act_bytes,
        attn=attn,
        lora_inputs=lora_in,
        checkpointing=ckpt,
        logits_chunk=chunk,
    )
    other_layers, _, other_peak = activation_bytes(
        llm_config,
        b * seq,
        seq,
        act_bytes=act_bytes,
        attn=attn,
        lora_inputs=lora_in,
        checkpointing=not ckpt,
        logits_chunk=chunk,
    )
    parts["activations"] = layers + peak
    parts["logits and loss"] = loss
    # time
    n_llm = sum(
        p.numel()
        for n, p in model.llm.named_parameters()
        if "embed_tokens" not in n and "wte" not in n and "wpe" not in n and ".lora_" not in n
    )
    lora_params = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    h, L = llm_config.hidden_size, llm_config.num_hidden_layers
    forward = 2.0 * n_llm + 2.0 * L * seq * h  # weights + causal attention (half of 4·s·h per layer)
    # forward, backward to the activations (as much again), one more forward when checkpointing;
    # LoRA's own matmuls forward and backward (weights and inputs): 6 per parameter
    flops = forward * (3 if ckpt else 2) + 6.0 * lora_params
    name, tflops, _ = device_figures(settings)
    mfu = settings.mfu or MEASURED_MFU[stage]
    return Plan(
        stage=stage,
        strategy=strategy,
        world_size=world,
        batch_size=b,
        seq_len=seq,
        parts=parts,
        host=host,
        activations_checkpointed=other_layers + other_peak,
        checkpointing=ckpt,
        params={
            "trainable": n_train,
            "frozen": sum(p.numel() for p in model.parameters()) - n_train,
            "llm": sum(p.numel() for p in model.llm.parameters()),
        },
        flops_per_token=flops,
        tokens_per_s=mfu * tflops * 1e12 * world / flops,
        mfu=mfu,
        peak_tflops=tflops,
        device=name,
        sources=[source],
    )


def check_fits(plan: Plan, memory_gib: float | None, allow: bool) -> str | None:
    """None when the plan fits ``memory_gib`` (or there is no figure to check); else the refusal."""
    if memory_gib is None or plan.total <= memory_gib * GIB:
        return None
    msg = (
        f"the memory plan needs {plan.total / GIB:.1f} GiB per rank, more than the device's {memory_gib:.1f} GiB:\n"
        f"{plan.table()}\nLower stage.batch_size, set model.llm.activation_checkpointing=true (plan: "
        f"{plan.total_with(True) / GIB:.1f} GiB), shard with strategy=fsdp or deepspeed_zero3, or set "
        f"plan.allow_over_memory=true to start anyway"
    )
    return None if allow else msg
