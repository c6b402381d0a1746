"""Faults injected into a real run through the CLI: a role's process is SIGKILLed mid-run.

    generator engine killed   the run continues: Ray restarts it, it is re-synced, the step re-sampled
    reward actor killed       restarted once and its call retried: the run continues
    policy learner killed     one line naming the rank and the last good checkpoint; --resume=auto resumes
Every run must log each step exactly once (none lost, none doubled).
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
STEPS = 6
ARGS = ["configs/quickstart.yaml", "run.stages=[rl]", "rl.init_from=builtin:tiny", f"rl.steps={STEPS}",
        "rl.save_every=2", "rl.sample_every=0", "logging.report=false", "logging.tensorboard=false",
        "reward.sources=[{kind: function, path: 'rlhf_ray.data.builtin_reviews:vader_reward'}]"]


def start(out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    return subprocess.Popen([sys.executable, "-m", "rlhf_ray.cli", "train", *ARGS, f"run.output_dir={out}", *extra],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def steps_logged(out: Path) -> list[int]:
    f = out / "rl" / "metrics.jsonl"
    return [json.loads(x)["step"] for x in f.read_text().splitlines() if x.strip()] if f.exists() else []


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (Ray's raylet and its workers hang below the driver)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def role_pid(driver: int, actor_class: str) -> int:
    """The worker process running `actor_class` (Ray titles it `ray::Class` or `ray::Class.method`)."""
    for pid in descendants(driver):
        try:
            title = open(f"/proc/{pid}/cmdline").read().split("\0")[0]
        except OSError:
            continue
        if re.match(rf"ray::{actor_class}(\.|\s|$)", title):
            return pid
    raise AssertionError(f"no ray::{actor_class} process under {driver}")


def kill_after(proc: subprocess.Popen, out: Path, actor_class: str, after_step: int, timeout: float = 600) -> int:
    deadline = time.time() + timeout
    while len(steps_logged(out)) < after_step:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "the run did not reach the step"
        time.sleep(0.2)
    pid = role_pid(proc.pid, actor_class)
    os.kill(pid, signal.SIGKILL)
    return pid


def finish(proc: subprocess.Popen, timeout: float = 900) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return proc.returncode, err


@pytest.mark.parametrize("actor_class", ["GeneratorActor", "RewardActor"])
def test_run_survives_a_killed_role(tmp_path, actor_class):
    proc = start(tmp_path)
    kill_after(proc, tmp_path, actor_class, after_step=2)
    rc, err = finish(proc)
    assert rc == 0, err[-3000:]
    assert steps_logged(tmp_path) == list(range(1, STEPS + 1))  # nothing lost, nothing doubled
    rows = [json.loads(x) for x in (tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()]
    # the generator serves the learner's weights after its restart (re-synced, not the initial ones)
    assert max(r["sync/logprob_max_abs"] for r in rows if "sync/logprob_max_abs" in r) < 1e-3


def test_killed_learner_names_rank_and_checkpoint_then_resume_auto_continues(tmp_path):
    proc = start(tmp_path)
    kill_after(proc, tmp_path, "PolicyRank", after_step=3)
    rc, err = finish(proc)
    lines = [x for x in err.splitlines() if x.startswith("rlhf-ray: error: ")]
    assert rc == 1 and len(lines) == 1, err[-3000:]
    assert re.search(r"step [45], policy learner rank 0: the policy learner rank 0 process died .*last good "
                     r"checkpoint: \S+/rl/checkpoints/step_00000[24] \(rerun with --resume=auto", lines[0]), lines[0]
    assert "Traceback" not in err
    proc = start(tmp_path, "--resume=auto")
    rc, err = finish(proc)
    assert rc == 0, err[-3000:]
    assert steps_logged(tmp_path) == list(range(1, STEPS + 1))
    assert (tmp_path / "rl" / "model" / "config.json").exists()
