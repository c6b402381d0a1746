"""Shared by the end-to-end tests: the CLI as a user runs it, and what a run leaves behind."""
import json
import os
import subprocess
import sys
from pathlib import Path

from rlhf_ray.utils.net import free_port  # noqa: F401  (re-exported for the tests)

ROOT = Path(__file__).resolve().parents[2]
QUICK = str(ROOT / "configs" / "quickstart.yaml")


def train(*args, timeout=900, check=True):
    """`rlhf-ray train configs/quickstart.yaml ARGS...`; raises with the run's output when it fails."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    p = subprocess.run([sys.executable, "-m", "rlhf_ray.cli", "train", QUICK, *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"train failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return p


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
