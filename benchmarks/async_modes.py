"""Lockstep vs lag-1 overlap vs async vs async with partial rollouts (#26), colocated on this CPU node.

The tiny case of `rl_vs_trl.py` (builtin:tiny-3m after a short SFT, 8 prompts x 4 samples x 32 tokens, GRPO,
VADER reward), one run per mode, one after the other, no TRL:
    colocated                 lockstep: generate, score, update, push, in turn, each with every core
    colocated-overlap         rollout.sync.max_off_policy_lag=1: the next batch sampled beside the update
    colocated-async           rollout.mode=async, lag 2: the producer thread samples up to 2 batches ahead
    colocated-async-partial   the same with rollout.partial (chunks of 8 tokens: pushes land mid-batch)

Reported per mode: median step time (steps 2..), samples per second (rows per step / median step time), reward
per sample (the mean of reward/score_mean over the run, and its rise first-3 -> last-3 steps), mean token
staleness. Writes benchmarks/results/async_modes.json with the machine (CPU model, flags, GEMM peaks).

    python benchmarks/async_modes.py [--steps 12] [--case smollm2]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rl_vs_trl import CASES, RESULTS, policy_path, run_ours, summary  # noqa: E402

MODES = ("colocated", "colocated-overlap", "colocated-async", "colocated-async-partial")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    ap.add_argument("--case", default="tiny", choices=["tiny", "smollm2"],
                    help="rl_vs_trl.py's case: the tiny model after SFT, or SmolLM2-135M-Instruct with LoRA r16")
    args = ap.parse_args()
    from rlhf_ray.utils.capability import describe, machine_record
    cpu = machine_record(2)
    print(describe(cpu))
    case = CASES[args.case]
    model = policy_path(args.case, case)
    rows_per_step = case["n_prompts"] * case["group"]
    out = {"setup": {k: v for k, v in case.items() if k != "ours"} | {"case": args.case, "steps": args.steps},
           "cpu": cpu}
    for mode in args.modes:
        run = run_ours(args.case, case, model, args.steps, mode)
        s = summary(run)
        s.update({"samples_per_s": rows_per_step / s["median_step_s"],
                  "reward_per_sample": statistics.mean(run["reward"]),
                  "staleness_mean": statistics.mean(run["staleness_mean"]), "per_step": run})
        out[mode] = s
        print(f"{mode:24} step {s['median_step_s']:.3f} s (median)  {s['samples_per_s']:6.1f} samples/s  reward/sample "
              f"{s['reward_per_sample']:+.3f}  rise {s['reward_rise']:+.3f}  staleness {s['staleness_mean']:.2f}  "
              f"tokens {s['mean_tokens']:.1f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / ("async_modes.json" if args.case == "tiny" else f"async_modes-{args.case}.json")
    path.write_text(json.dumps(out, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
