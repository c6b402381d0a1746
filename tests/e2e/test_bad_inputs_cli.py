"""Bad inputs found mid-run, end to end: each stops with one clear message (no Python traceback) or is handled
as configured. Those found before Ray starts are in tests/test_bad_inputs.py (the fast tier)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


def train(tmp_path, *args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0",
           "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "rlhf_ray.cli", "train", "configs/quickstart.yaml",
                           f"run.output_dir={tmp_path}", "run.stages=[rl]", "rl.steps=2", "rl.save_every=0", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


NAN = "reward.sources=[{kind: function, path: 'rewards_for_tests:nan_reward'}]"


def fn_reward(name: str) -> str:
    return f"reward.sources=[{{kind: function, path: 'rewards_for_tests:{name}'}}]"


# The long tier's: `make test` raises the error with its counts and rows in rl/test_advantage_step.py and from
# the controller's step in rl/test_controller.py::test_nan_reward_policies, turns a RunError raised in a step
# into one line naming the step (test_errors.py), and shows a real run stopping mid-run on a reward error as
# that one line, exit 1, no traceback, no export, in the test below (its reward raises on step 2)
@pytest.mark.long
def test_nan_reward_stops_with_a_clear_error(tmp_path):
    p = train(tmp_path, NAN)
    assert p.returncode == 1
    assert "BadRewardError: reward is NaN or infinite for 1 of 64 responses (rows [3])" in p.stderr
    assert "Traceback" not in p.stderr
    assert not (tmp_path / "rl" / "model").exists()


# A NaN reward handled as configured (reward.on_nonfinite=drop_group) is test_faults.py's generator-and-reward
# run: its reward function returns one NaN a call.


# -- raised inside an actor, mid-run -------------------------------------------------------------
def test_reward_function_raising_mid_run_is_one_line_with_the_users_frames(tmp_path):
    p = train(tmp_path, fn_reward("fails_on_second_call"))
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    errors = [i for i, x in enumerate(lines) if x.startswith("rlhf-ray: error: ")]
    assert p.returncode == 1 and len(errors) == 1, p.stderr[-3000:]
    line = lines[errors[0]]
    assert "step 2, reward: RewardSourceError: reward function:rewards_for_tests:fails_on_second_call raised " \
           "ValueError: cannot score" in line, line
    below = "\n".join(lines[errors[0] + 1:])
    assert 'rewards_for_tests.py", line' in below and "in _score" in below
    assert "Traceback" not in p.stderr and "ray/" not in below and "RayTaskError" not in p.stderr
    assert not (tmp_path / "rl" / "model").exists()
