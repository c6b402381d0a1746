"""The reward-model stage killed with SIGKILL and resumed, N times over: does every step get logged exactly once?

Each round runs `rlhf-ray rm` (160 steps, a checkpoint every 8) in its own process group, kills the whole
group once Ray Train holds two checkpoints and the stage has logged past them, then runs the same command
again (the stage's own command resumes from its last checkpoint) and reads `rm/metrics.jsonl`. The fault this
hunts (issue 23): a driver killed between taking a step's record and writing it lost that step for good.

    python benchmarks/kill_resume_loop.py [--rounds 20] [--out benchmarks/results/kill_resume_loop.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUICK = str(ROOT / "configs" / "quickstart.yaml")
TOTAL, EVERY = 160, 8


def _steps(stage_dir: Path) -> list[int]:
    path = stage_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [r["step"] for r in (json.loads(x) for x in path.read_text().splitlines() if x.strip()) if "loss" in r]


def one_round(out: Path) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    args = [sys.executable, "-m", "rlhf_ray.cli", "rm", QUICK, f"run.output_dir={out}", "data.num_samples=400",
            "logging.console=false", "cluster.torch_threads=1", "rm.batch_size=8", "rm.epochs=8",
            f"rm.max_steps={TOTAL}", f"rm.save_every={EVERY}", "rm.eval_every=0"]
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    t0, killed_at = time.time(), None
    while time.time() - t0 < 600 and proc.poll() is None:
        if len(list((out / "quickstart-rm").glob("rm-step_*"))) >= 2 and max(_steps(out / "rm"), default=0) > 2 * EVERY:
            killed_at = max(_steps(out / "rm"), default=0)
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    resumed = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    steps = _steps(out / "rm")
    return {"killed_after_step": killed_at, "resume_exit": resumed.returncode,
            "every_step_once": steps == list(range(1, TOTAL + 1)),
            "missing": sorted(set(range(1, TOTAL + 1)) - set(steps)),
            "repeated": sorted({s for s in steps if steps.count(s) > 1}), "seconds": round(time.time() - t0, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "kill_resume_loop.json"))
    a = parser.parse_args()
    rounds = []
    for i in range(a.rounds):
        with tempfile.TemporaryDirectory(prefix="kill_resume_") as tmp:
            r = one_round(Path(tmp))
        rounds.append(r)
        print(f"round {i + 1}/{a.rounds}: killed after step {r['killed_after_step']}, resume exit {r['resume_exit']}, "
              f"every step once: {r['every_step_once']} (missing {r['missing']}, repeated {r['repeated']}) "
              f"in {r['seconds']} s", flush=True)
    good = sum(r["every_step_once"] and r["resume_exit"] == 0 for r in rounds)
    result = {"cpu": platform.processor() or _cpu_model(), "rounds": rounds, "good": good, "of": a.rounds}
    Path(a.out).write_text(json.dumps(result, indent=2))
    print(f"{good} of {a.rounds} rounds logged every step once -> {a.out}")
    return 0 if good == a.rounds else 1


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


if __name__ == "__main__":
    sys.exit(main())
