"""Per-GPU memory line items of each role, in bytes, from a `ModelShape` and the config.

Every item says in which phases of an RL step it is live: `generate` (vLLM), `score` (reward, reference,
values) and `train` (policy/critic update). A GPU's peak is the largest phase total, so a colocated engine
that sleeps while the learner trains (vLLM sleep mode, level 1: weights to host RAM, KV cache dropped) is
counted only in `generate`. Formulas and their sources:
  - weights: parameters x bytes of the dtype; NF4 4-bit with double quantization costs 4 + 8/64 +
    32/(64*256) = 4.127 bits per parameter (QLoRA paper, section 3), 4.5 bits without; embeddings,
    norms and lm_head stay in the compute dtype (bitsandbytes and vLLM fp8 quantize linear layers only).
  - gradients and Adam (mixed precision): 2 bytes grad + 4 + 4 (m, v) + 4 (fp32 master) per trainable
    parameter (ZeRO paper, section 3.1: "K = 12"); ZeRO-1 partitions optimizer states over the ranks,
    ZeRO-2 gradients too, ZeRO-3 the weights too (then 2 layers are gathered at a time).
  - activations (bf16, flash attention so no sequence-squared term; Korthikanti et al. 2022 adapted to a
    gated MLP): per token and layer, both norms' inputs and outputs, Q, K, V, attention output and the
    four MLP intermediates: (4H + 2q + 2kv + 4I) x bytes. Gradient checkpointing keeps only each
    layer's input (H x bytes) plus one layer recomputed in backward.
  - logits: tokens x V x (bytes + 12) in training (logits, an fp32 copy, log-softmax, its fp32
    gradient), bytes + 8 without grad. The LM head runs over the response positions only (`logits_to_keep`),
    so those tokens are micro-batch x (max_new_tokens + 1), not the whole sequence.
Calibrated on CUDA (H100, random-weight Llama-3.1-8B, `benchmarks/cuda_memory.py`, the 4090 config: NF4 + LoRA
r64, micro-batch 2 x 1024 tokens): the persistent learner state measured 7.57 GiB against 7.81 planned; the
train phase's peak above it 1.98 GiB against 2.85 planned (activations, logits, gradients); the reference
pass's 0.74 against 1.23. The plan stays on the safe side.
Constants below are estimates, not measurements; they are named so that a reader can argue with them.
"""
from __future__ import annotations

from dataclasses import dataclass

from rlhf_ray.placement.shapes import ModelShape

GiB = float(2 ** 30)
PHASES = ("generate", "score", "train")
ALL = frozenset(PHASES)
DTYPE_BYTES = {"float32": 4.0, "bfloat16": 2.0, "float16": 2.0, "fp8": 1.0}
# CUDA context, torch's kernels, NCCL buffers: what a process holds on its GPU outside torch's allocator.
# Measured on an H100 (benchmarks/results/cuda_memory.json): device memory used minus the allocator's reserved
# peak was 1.302 GiB in both runs (torch 2.11, CUDA 13). A test keeps this at or above the measurement.
PROCESS_OVERHEAD = 1.3 * GiB
# vLLM's profiled peak outside weights and KV cache (activations at max_num_batched_tokens, sampler);
# CUDA graphs (enforce_eager=false) add their captured pools.
ENGINE_OVERHEAD = {True: 1.0 * GiB, False: 2.0 * GiB}


@dataclass(frozen=True)
class Item:
    role: str
    name: str
    bytes: float
    phases: frozenset = ALL
    host: bool = False     # lives in the node's RAM, not on the GPU


def nf4_bits(double_quant: bool) -> float:
    return 4 + 8 / 64 + 32 / (64 * 256) if double_quant else 4 + 32 / 64


def activation_bytes_per_token(s: ModelShape, dtype_bytes: float, checkpointing: bool) -> float:
    mlp = (2 if s.encoder else 4) * s.intermediate
    per_layer = (4 * s.hidden + 2 * s.q_dim + 2 * s.kv_dim + mlp) * dtype_bytes
    if checkpointing:
        return s.layers * s.hidden * dtype_bytes + per_layer
    return s.layers * per_layer


def logits_bytes(s: ModelShape, tokens: int, dtype_bytes: float, grad: bool) -> float:
    return tokens * s.vocab * (dtype_bytes + (12 if grad else 8))


@dataclass(frozen=True)
class LearnerSpec:
    """What the memory of one learner rank depends on (read from the config by the plan)."""
    head: str                 # "lm" (policy) or "value" (critic)
    dtype: str                # compute / storage dtype name
    world: int                # ranks the ZeRO stage partitions over
    zero_stage: int
    offload_optimizer: bool
    offload_params: bool
    checkpointing: bool
    tokens: int               # micro_batch_size x sequence length
    logit_tokens: int = 0     # micro_batch_size x (max_new_tokens + 1): positions the LM head runs over; 0: tokens
    lora_params: int = 0      # 0: full fine-tuning
    nf4_double_quant: bool | None = None  # None: not quantized
    ref_forward: bool = False  # the policy also scores reference log-probs (LoRA adapter off)


def learner_items(role: str, s: ModelShape, spec: LearnerSpec) -> list[Item]:
    b = DTYPE_BYTES[spec.dtype]
    total = s.params(spec.head)
    trainable = spec.lora_params or total
    z, w = spec.zero_stage, spec.world
    part = lambda n, stage: n / w if z >= stage else n  # noqa: E731 - ZeRO partitions from `stage` on
    items = []
    if spec.nf4_double_quant is not None:
        linear = s.linear_params()
        nf4 = linear * nf4_bits(spec.nf4_double_quant) / 8 + (total - linear) * b
        items.append(Item(role, "base weights (nf4)", nf4))
    else:
        name = "base weights" if spec.lora_params else "weights"
        items.append(Item(role, f"{name} ({spec.dtype})", part(total * b, 3), host=z == 3 and spec.offload_params))
    if spec.lora_params:
        items.append(Item(role, f"LoRA adapter ({spec.dtype})", part(trainable * b, 3)))
    items.append(Item(role, "gradients", part(trainable * b, 2)))
    adam = trainable * (8 + (4 if b < 4 else 0))
    items.append(Item(role, "optimizer (Adam m, v" + (", fp32 master)" if b < 4 else ")"), part(adam, 1),
                      host=spec.offload_optimizer))
    if z == 3:
        items.append(Item(role, "ZeRO-3 gathered layers", 2 * s.layer_params() * b, frozenset({"score", "train"})))
    items.append(Item(role, "activations" + (" (checkpointed)" if spec.checkpointing else ""),
                      spec.tokens * activation_bytes_per_token(s, b, spec.checkpointing), frozenset({"train"})))
    if spec.head == "lm":
        head_tokens = spec.logit_tokens or spec.tokens
        items.append(Item(role, "logits (train)", logits_bytes(s, head_tokens, b, grad=True), frozenset({"train"})))
        if spec.ref_forward:
            items.append(Item(role, "logits (reference, adapter off)", logits_bytes(s, head_tokens, b, grad=False),
                              frozenset({"score"})))
    return items


def engine_weight_bytes(s: ModelShape, dtype: str, quantization: str | None, tp: int) -> float:
    """vLLM weights on one of `tp` GPUs; fp8 replaces the linear layers only."""
    b = DTYPE_BYTES[dtype]
    if quantization is not None and quantization.startswith("fp8"):  # fp8_per_tensor, fp8_per_channel (scales: noise)
        linear = s.linear_params()
        return (linear * 1.0 + (s.params() - linear) * b) / tp
    return s.params() * b / tp


def engine_items(s: ModelShape, *, dtype: str, quantization: str | None, tp: int, utilization: float,
                 capacity: float, enforce_eager: bool, sleeps: bool, lora_params: int = 0) -> list[Item]:
    """vLLM reserves utilization x capacity; what weights, adapter slot and overhead leave is KV cache."""
    live = frozenset({"generate"}) if sleeps else ALL
    weights = engine_weight_bytes(s, dtype, quantization, tp)
    label = quantization or dtype
    items = [Item("generator", f"engine weights ({label}, TP={tp})" if tp > 1 else f"engine weights ({label})",
                  weights, live)]
    if lora_params:
        items.append(Item("generator", "engine LoRA slot", lora_params * DTYPE_BYTES[dtype] / tp, live))
    items.append(Item("generator", "engine activations + sampler", ENGINE_OVERHEAD[enforce_eager], live))
    kv = utilization * capacity - sum(i.bytes for i in items)
    items.append(Item("generator", "KV cache", kv, live))
    if sleeps:
        items.append(Item("generator", "engine weights while asleep", weights, frozenset({"train", "score"}),
                          host=True))
    return items


def frozen_items(role: str, s: ModelShape, *, head: str, dtype: str, tokens: int, logit_tokens: int = 0) -> list[Item]:
    """Reference (head="lm") or reward model (head="score"): weights plus one no-grad micro-batch
    (`logit_tokens`: the positions the LM head runs over, default all `tokens`)."""
    b = DTYPE_BYTES[dtype]
    items = [Item(role, f"weights ({dtype})", s.params(head) * b),
             Item(role, "forward activations", tokens * activation_bytes_per_token(s, b, True),
                  frozenset({"score"}))]
    if head == "lm":
        items.append(Item(role, "logits (no grad)", logits_bytes(s, logit_tokens or tokens, b, grad=False),
                          frozenset({"score"})))
    return items


def peak(items: list[Item]) -> tuple[str, float]:
    """(phase, bytes) of the largest GPU total over the phases."""
    totals = {p: sum(i.bytes for i in items if p in i.phases and not i.host) for p in PHASES}
    phase = max(PHASES, key=lambda p: totals[p])
    return phase, totals[phase]
