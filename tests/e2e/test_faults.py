"""Faults injected into a real run through the CLI: a role's process is SIGKILLed mid-run.

    generator engine killed   the run continues: Ray restarts it, it is re-synced, the step re-sampled
    reward actor killed       restarted once and its call retried: the run continues
    policy learner killed     one line naming the rank and the last good checkpoint; --resume=auto resumes
Every run must log each step exactly once (none lost, none doubled). These runs use the distributed
placement, where each role is a process of its own that can die alone (colocated, one process holds them
all: its death is the learner-killed case).
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

from helpers import SAME_AFTER_RESUME, rl_steps_logged, start_train, training_rows  # noqa: E402  (tests/e2e is on the path)

HERE = str(Path(__file__).parent)  # rewards_for_tests, as a user's own module
STEPS = 6
ARGS = ["configs/quickstart.yaml", "run.stages=[rl]", "rl.init_from=builtin:tiny", f"rl.steps={STEPS}",
        "rl.save_every=2", "rl.sample_every=0", "logging.report=false", "logging.tensorboard=false",
        "reward.sources=[{kind: function, path: 'rlhf_ray.data.builtin_reviews:vader_reward'}]",
        "cluster.placement=distributed"]


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


def busy_pid(driver: int, call: str) -> int | None:
    """The worker process now running `call` ("Class.method"): Ray titles it `ray::Class.method` meanwhile."""
    for pid in descendants(driver):
        try:
            title = open(f"/proc/{pid}/cmdline").read().split("\0")[0]
        except OSError:
            continue
        if re.match(rf"ray::{re.escape(call)}(\(|\s|$)", title):
            return pid
    return None


def kill_during(proc: subprocess.Popen, out: Path, call: str, after_step: int, timeout: float = 600) -> int:
    """SIGKILL the process of `call` while it runs, in the first step after `after_step` is logged."""
    deadline = time.time() + timeout
    while True:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, f"the run did not reach a {call} after step {after_step}"
        if len(rl_steps_logged(out)) >= after_step and (pid := busy_pid(proc.pid, call)):
            os.kill(pid, signal.SIGKILL)
            return pid
        time.sleep(0.05)


def finish(proc: subprocess.Popen, timeout: float = 900) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return proc.returncode, err


# slow (the reward actor stays in `score` long enough to be killed there), and a NaN in every call: the run
# drops that response's group, as configured (a bad reward that is handled, not fatal)
SLOW_REWARD = ("reward.sources=[{kind: function, path: 'rewards_for_tests:slow_vader_one_nan'}]",
               "reward.on_nonfinite=drop_group")


def test_run_survives_its_generator_then_its_reward_actor_killed_mid_call(tmp_path):
    """One run, two faults: the generator engine killed while it samples step 3, the reward actor killed while
    it scores step 5 (a slow reward function keeps it in `score` long enough). Its reward function also
    returns one NaN a call, and `reward.on_nonfinite=drop_group` drops that group on every step."""
    proc = start_train(ARGS, tmp_path, *SLOW_REWARD, pythonpath=HERE)
    generator = kill_during(proc, tmp_path, "GeneratorActor.generate", after_step=2)
    reward = kill_during(proc, tmp_path, "RewardActor.score", after_step=4)
    rc, err = finish(proc)
    assert rc == 0, err[-3000:]
    assert generator != reward
    assert rl_steps_logged(tmp_path) == list(range(1, STEPS + 1))  # nothing lost, nothing doubled
    rows = [json.loads(x) for x in (tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()]
    # the generator serves the learner's weights after its restart (re-synced, not the initial ones)
    assert max(r["sync/logprob_max_abs"] for r in rows if "sync/logprob_max_abs" in r) < 1e-3
    assert all(r["reward/nonfinite"] == 1 for r in rows)  # the NaN's group dropped on every step, the run went on


def test_killed_learner_names_rank_and_checkpoint_then_resume_auto_redoes_the_step_exactly(tmp_path):
    """The policy learner killed while it updates step 4 (step 3 logged, checkpoint at step 2): one line naming
    the rank and the checkpoint; `--resume=auto` restores the learner and the engines from step 2, redoes step
    3 exactly as before and finishes, every step logged once (the distributed placement's exact resume with
    full weights; test_train_cli.py's colocated GRPO run is the other placement's)."""
    proc = start_train(ARGS, tmp_path, pythonpath=HERE)
    kill_during(proc, tmp_path, "PolicyRank.update", after_step=3)
    rc, err = finish(proc)
    lines = [x for x in err.splitlines() if x.startswith("rlhf-ray: error: ")]
    assert rc == 1 and len(lines) == 1, err[-3000:]
    assert re.search(r"step 4, policy learner rank 0: the policy learner rank 0 process died .*last good "
                     r"checkpoint: \S+/rl/checkpoints/step_000002 \(rerun with --resume=auto", lines[0]), lines[0]
    assert "Traceback" not in err
    before = training_rows(tmp_path / "rl")
    assert [r["step"] for r in before] == [1, 2, 3]
    proc = start_train(ARGS, tmp_path, "--resume=auto", pythonpath=HERE)
    rc, err = finish(proc)
    assert rc == 0, err[-3000:]
    assert rl_steps_logged(tmp_path) == list(range(1, STEPS + 1))
    after = training_rows(tmp_path / "rl")
    assert after[:2] == before[:2]  # the steps before the checkpoint were kept, not redone
    for key in SAME_AFTER_RESUME:  # step 3 again, from the step-2 checkpoint: the same as before the kill
        assert after[2][key] == pytest.approx(before[2][key], rel=1e-4, abs=1e-6), key
    assert (tmp_path / "rl" / "model" / "config.json").exists()
