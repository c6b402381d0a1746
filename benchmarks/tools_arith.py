"""The arithmetic-with-a-calculator run (configs/cpu/tools-arith.yaml) against the same task without the tool:
held-out exact-answer accuracy (greedy and sampled) at each evaluation, tool calls per episode, step times. Reads
the runs' metrics.jsonl and writes one JSON with the machine's record.

    rlhf-ray train configs/cpu/tools-arith.yaml run.output_dir=runs/arith-tool
    rlhf-ray train configs/cpu/tools-arith.yaml env.tools=[] rollout.max_turns=1 run.output_dir=runs/arith-notool
    python benchmarks/tools_arith.py runs/arith-tool runs/arith-notool --command "..." --out benchmarks/results/tools_arith.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

EVAL_KEYS = ("eval/greedy_env_reward", "eval/sampled_env_reward", "eval/greedy_tool_calls", "eval/sampled_tool_calls")
STEP_KEYS = ("episode/reward", "episode/tool_calls", "episode/tool_errors", "episode/turns", "episode/policy_tokens",
             "episode/env_tokens", "timing/step_s")


def summarize(run: Path) -> dict:
    rows = [json.loads(line) for line in (run / "rl" / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: {k: r[k] for k in EVAL_KEYS if k in r} for r in rows if "eval/greedy_env_reward" in r}
    steps = [{"step": r["step"], **{k: r[k] for k in STEP_KEYS if k in r}} for r in rows if "episode/turns" in r]
    return {"run": str(run), "evaluations": evals, "steps": steps,
            "config": json.loads((run / "rl" / "run_config.json").read_text()) if (run / "rl" / "run_config.json").exists() else None}


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
