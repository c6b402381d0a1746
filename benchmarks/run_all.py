"""Every benchmark, one after the other (never two at once: 2 cores), each writing its JSON to
benchmarks/results/. `make bench` runs this; pass names to run a subset:

    python benchmarks/run_all.py [algo offline sync rollout rl_vs_trl ppo_vs_trl learning token_budget]
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHES = {
    "algo": ["algo_bench.py"],
    "offline": ["offline_bench.py"],
    "sync": ["sync_bench.py", "--models", "tiny", "smollm2-135m"],
    "rollout": ["rollout_bench.py"],
    "rl_vs_trl": ["rl_vs_trl.py"],
    "ppo_vs_trl": ["ppo_vs_trl.py", "--steps", "20"],
    "learning": ["learning_bench.py", "--steps", "40", "--new-tokens", "24", "--lr", "5e-4"],
    "token_budget": ["token_budget.py", "--repeats", "10"],
}


def main() -> int:
    names = sys.argv[1:] or list(BENCHES)
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        print(f"unknown benchmark(s) {unknown}; choose from {list(BENCHES)}", file=sys.stderr)
        return 2
    for name in names:
        t0 = time.time()
        print(f"== {name}", flush=True)
        rc = subprocess.run([sys.executable, str(HERE / BENCHES[name][0]), *BENCHES[name][1:]], cwd=HERE.parent).returncode
        print(f"== {name}: exit {rc} in {time.time() - t0:.0f} s", flush=True)
        if rc:
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
