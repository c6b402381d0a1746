"""The DeepSpeed config, built from `LearnerConfig` by a pure function (testable without DeepSpeed).

Decisions:
- The optimizer is torch's `AdamW`, handed to DeepSpeed as a client optimizer with
  `zero_allow_untested_optimizer`: DeepSpeed then compiles no C++/CUDA op at all (its own CPU Adam and
  fused Adam cost minutes of first-use compilation, see STACK.md). On GPU the same torch AdamW runs fused
  CUDA kernels of its own (`foreach`), so nothing is lost by keeping one path.
- Gradient accumulation is driven by the caller (`Learner.train_step` marks the boundary micro-batch),
  so `gradient_accumulation_steps` here only satisfies DeepSpeed's batch-size bookkeeping.
- `stage3_param_persistence_threshold: 0` partitions every parameter under ZeRO-3, small ones included,
  so ranks never hold diverging private copies and a per-parameter gather yields the full state dict.
"""
from __future__ import annotations

import torch

from rlhf_ray.config.schema import LearnerConfig


def deepspeed_config(cfg: LearnerConfig, *, world_size: int, dtype: torch.dtype) -> dict:
    zero: dict = {"stage": cfg.deepspeed.zero_stage}
    if cfg.deepspeed.zero_stage == 3:
        zero["stage3_param_persistence_threshold"] = 0
    if cfg.deepspeed.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if cfg.deepspeed.offload_params:
        zero["offload_param"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        # Accumulation boundaries are set per step by `Learner.train_step` (a step's batch decides how many
        # micro-batches it takes), so DeepSpeed's own counter stays at 1.
        "gradient_accumulation_steps": 1,
        "train_batch_size": cfg.micro_batch_size * world_size,
        "gradient_clipping": cfg.optim.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": False},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def lr_lambda(scheduler: str, warmup_steps: int, total_steps: int):
    """Multiplier of the base lr at optimizer step `s`: linear warm-up, then constant / linear / cosine to 0."""
    import math

    def fn(s: int) -> float:
        if s < warmup_steps:
            return (s + 1) / (warmup_steps + 1)
        if scheduler == "constant":
            return 1.0
        span = max(1, total_steps - warmup_steps)
        frac = min(1.0, (s - warmup_steps) / span)
        return 1.0 - frac if scheduler == "linear" else 0.5 * (1.0 + math.cos(math.pi * frac))

    return fn
