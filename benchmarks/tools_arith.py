"""The arithmetic-with-a-calculator run (configs/cpu/tools-arith.yaml: SFT warm start, then GRPO) against the same
task without the tool: held-out exact-answer accuracy (greedy and sampled) at each evaluation, tool calls per
episode, step times, and the SFT stage's loss where the run had one. Reads the runs' metrics.jsonl and writes one
JSON with the machine's record.

    rlhf-ray train configs/cpu/tools-arith.yaml run.output_dir=runs/arith-tool
    rlhf-ray train configs/cpu/tools-arith.yaml env.tools=[] rollout.max_turns=1 run.stages=[rl] \
        rl.init_from=runs/arith-tool/sft/model run.output_dir=runs/arith-notool
    python benchmarks/tools_arith.py runs/arith-tool runs/arith-notool --command "..." --out benchmarks/results/tools_arith.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

EVAL_KEYS = ("eval/greedy_env_reward", "eval/sampled_env_reward", "eval/greedy_tool_calls", "eval/sampled_tool_calls")
STEP_KEYS = ("episode/reward", "episode/tool_calls", "episode/tool_errors", "episode/turns", "episode/policy_tokens",
             "episode/env_tokens", "timing/step_s")


def _rows(metrics: Path) -> list[dict]:
    return [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]


def sft_summary(run: Path) -> dict | None:
    """The warm start: steps, first and last training loss, held-out loss, median step time (None: no SFT)."""
    metrics = run / "sft" / "metrics.jsonl"
    if not metrics.exists():
        return None
    rows = _rows(metrics)
    train = [r for r in rows if "sft/loss" in r]
    times = sorted(r["time/step_s"] for r in train if "time/step_s" in r)
    held = [r["eval/loss"] for r in rows if "eval/loss" in r]
    return {"steps": len(train), "first_loss": train[0]["sft/loss"] if train else None,
            "last_loss": train[-1]["sft/loss"] if train else None, "eval_loss": held[-1] if held else None,
            "median_step_s": times[len(times) // 2] if times else None}


def summarize(run: Path) -> dict:
    rows = _rows(run / "rl" / "metrics.jsonl")
    evals = {r["step"]: {k: r[k] for k in EVAL_KEYS if k in r} for r in rows if "eval/greedy_env_reward" in r}
    steps = [{"step": r["step"], **{k: r[k] for k in STEP_KEYS if k in r}} for r in rows if "episode/turns" in r]
    config = run / "rl" / "run_config.json"
    return {"run": str(run), "sft": sft_summary(run), "evaluations": evals, "steps": steps,
            "config": json.loads(config.read_text()) if config.exists() else None}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+", type=Path, help="run.output_dir of each run (tool first, then without)")
    ap.add_argument("--command", action="append", default=[], help="the command line of each run")
    ap.add_argument("--note", default="")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    from rlhf_ray.utils.capability import machine_record
    record = {"machine": machine_record(), "commands": args.command, "note": args.note,
              "runs": [summarize(r) for r in args.runs]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1))
    print(json.dumps({r["run"]: r["evaluations"] for r in record["runs"]}, indent=1))


if __name__ == "__main__":
    main()
