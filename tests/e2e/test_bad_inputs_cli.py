"""Bad inputs end to end: each stops with one clear message (no Python traceback) or is handled as configured."""
import json
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


def test_nan_reward_stops_with_a_clear_error(tmp_path):
    p = train(tmp_path, NAN)
    assert p.returncode == 1
    assert "BadRewardError: reward is NaN or infinite for 1 of 64 responses (rows [3])" in p.stderr
    assert "Traceback" not in p.stderr
    assert not (tmp_path / "rl" / "model").exists()


def test_nan_reward_dropped_by_group_when_configured(tmp_path):
    p = train(tmp_path, NAN, "reward.on_nonfinite=drop_group")
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["reward/nonfinite"] == 1 for r in rows)


def test_long_prompt_is_named_before_any_actor_starts(tmp_path):
    p = train(tmp_path, "data.max_prompt_len=3", "data.on_long_prompt=error",
              "reward.sources=[{kind: function, path: 'rewards_for_tests:nan_reward'}]")
    assert p.returncode == 1
    assert "PromptError: builtin:reviews row 0: prompt has" in p.stderr, p.stderr[-2000:] and "data.max_prompt_len=3" in p.stderr
    assert "Traceback" not in p.stderr
