"""Micro-benchmark of the algorithm core on a realistic batch: GAE and the PPO policy loss.

A script, not a test: prints milliseconds per call and writes JSON (default benchmarks/results/algo.json).
For context it also times the textbook GAE (a reverse Python loop over time, vectorised over the batch)
and checks that both give the same advantages.

    .venv/bin/python benchmarks/algo_bench.py --batch 512 --seq 1024 --threads 1

On CPU, glibc malloc hands each multi-MiB temporary back to the OS when it is freed, so the next call
page-faults it in again; for these memory-bound kernels that can cost 2-3x. The JSON records the malloc
settings in force; to see the arithmetic alone, run with
    MALLOC_MMAP_THRESHOLD_=1000000000 MALLOC_TRIM_THRESHOLD_=100000000000
(or under jemalloc/tcmalloc). GPU caching allocators do not have this cost.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from rlhf_ray.algo import gae, grpo, policy_loss, reverse_discounted_cumsum, value_loss
from rlhf_ray.utils.capability import describe, machine_record


def time_ms(fn: Callable[[], object], repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median and min wall time of ``fn()`` in milliseconds over ``repeats`` calls."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return {"median_ms": statistics.median(samples), "min_ms": min(samples), "repeats": repeats}


def loop_gae(rewards, values, mask, gamma, lam):
    """Textbook GAE: reverse loop over time, vectorised over the batch (the baseline to beat)."""
    t_len = rewards.shape[1]
    adv = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    v = values * mask
    for t in reversed(range(t_len)):
        next_v = v[:, t + 1] if t + 1 < t_len else torch.zeros_like(running)
        next_mask = mask[:, t + 1] if t + 1 < t_len else torch.zeros_like(running)
        delta = (rewards[:, t] + gamma * next_v - v[:, t]) * mask[:, t]
        running = delta + gamma * lam * next_mask * running
        adv[:, t] = running
    return adv, adv + v


def make_batch(batch: int, seq: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(seq // 8, seq + 1, (batch,), generator=g)  # ragged responses
    mask = (torch.arange(seq) < lengths.unsqueeze(-1)).float()
    rewards = torch.randn(batch, seq, generator=g) * 0.01 * mask
    values = torch.randn(batch, seq, generator=g)
    old_logp = -torch.rand(batch, seq, generator=g) * 3
    logp = (old_logp + torch.randn(batch, seq, generator=g) * 0.1).requires_grad_(True)
    return rewards, values, mask, old_logp, logp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads; default: torch's")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "algo.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    rewards, values, mask, old_logp, logp = make_batch(args.batch, args.seq)
    advantages = torch.randn(args.batch, args.seq) * mask
    gamma, lam = 1.0, 0.95

    fast_adv, fast_ret = gae(rewards, mask, values=values, gamma=gamma, lam=lam)
    slow_adv, slow_ret = loop_gae(rewards, values, mask, gamma, lam)
    max_abs_diff = max((fast_adv - slow_adv).abs().max().item(), (fast_ret - slow_ret).abs().max().item())

    def ppo_fwd_bwd():
        loss, _ = policy_loss(logp, old_logp, advantages, mask, dual_clip=3.0)
        loss.backward()
        logp.grad = None

    values_new = (values + 0.1).requires_grad_(True)
    cases = {
        "gae": lambda: gae(rewards, mask, values=values, gamma=gamma, lam=lam),
        "gae_whitened": lambda: gae(rewards, mask, values=values, gamma=gamma, lam=lam, whiten=True),
        "gae_time_loop_baseline": lambda: loop_gae(rewards, values, mask, gamma, lam),
        "scan_block16": lambda: reverse_discounted_cumsum(rewards, gamma * lam, 16),
        "scan_block32": lambda: reverse_discounted_cumsum(rewards, gamma * lam, 32),
        "scan_block64": lambda: reverse_discounted_cumsum(rewards, gamma * lam, 64),
        "ppo_policy_loss_fwd": lambda: policy_loss(logp, old_logp, advantages, mask, dual_clip=3.0),
        "ppo_policy_loss_fwd_bwd": ppo_fwd_bwd,
        "ppo_policy_loss_fwd_no_grad": lambda: policy_loss(logp.detach(), old_logp, advantages, mask),
        "value_loss_fwd": lambda: value_loss(values_new, values, fast_ret, mask),
        "grpo_n8": lambda: grpo(rewards, mask, group_size=8),
    }
    results = {}
    for name, fn in cases.items():
        repeats = max(3, args.repeats // 4) if name == "gae_time_loop_baseline" else args.repeats
        results[name] = time_ms(fn, repeats)
        print(f"{name:32s} {results[name]['median_ms']:9.2f} ms/call (min {results[name]['min_ms']:.2f})")
    speedup = results["gae_time_loop_baseline"]["median_ms"] / results["gae"]["median_ms"]
    print(f"GAE block scan vs time loop: {speedup:.1f}x faster, max |diff| {max_abs_diff:.2e}")

    report = {
        "batch": args.batch,
        "seq": args.seq,
        "tokens": int(mask.sum().item()),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "processor": platform.processor(),
        "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_") or k == "LD_PRELOAD"},
        "gae_scan_vs_loop_max_abs_diff": max_abs_diff,
        "gae_speedup_vs_time_loop": speedup,
        "results": results,
        "cpu": machine_record(),  # the CPU, its bf16 flags and GEMM peaks on these threads, measured now
    }
    print(describe(report["cpu"]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
