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
    # cluster.address points at nothing (NO_RAY below): a run that got as far as Ray would fail there instead
    p = train(tmp_path, "data.max_prompt_len=3", "data.on_long_prompt=error", "run.stages=[rl]",
              "reward.sources=[{kind: function, path: 'rewards_for_tests:nan_reward'}]", NO_RAY)
    assert p.returncode == 1, p.stderr[-2000:]
    assert "PromptError: builtin:reviews row 0: prompt has" in p.stderr, p.stderr[-2000:]
    assert "data.max_prompt_len=3" in p.stderr, p.stderr[-2000:]
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr[-2000:]


# -- found before Ray starts ---------------------------------------------------------------------
# cluster.address points at nothing: had the run got as far as starting Ray, it would fail there instead.
NO_RAY = "cluster.address=ray://127.0.0.1:1"


def fn_reward(name: str) -> str:
    return f"reward.sources=[{{kind: function, path: 'rewards_for_tests:{name}'}}]"


def one_line_before_ray(p, *expected: str) -> str:
    """The run stopped with exit 1 and one error line (plus the user's own frames, if any), before Ray."""
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    assert p.returncode == 1, p.stderr[-3000:]
    assert lines and lines[0].startswith("rlhf-ray: error: "), p.stderr[-3000:]
    assert all(x.startswith("  ") for x in lines[1:]), p.stderr[-3000:]  # only indented user frames follow
    assert "Traceback" not in p.stderr and "ray" not in p.stderr.lower().replace("rlhf-ray", "").replace("rlhf_ray", "")
    for e in expected:
        assert e in lines[0], lines[0]
    return lines[0]


def test_folder_without_a_model_is_named(tmp_path):
    empty = tmp_path / "not_a_model"
    empty.mkdir()
    one_line_before_ray(train(tmp_path, f"model.path={empty}", NO_RAY, fn_reward("nan_reward")),
                        "model.path", str(empty), "holds no model (no config.json)")


def test_unknown_architecture_is_named(tmp_path):
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.json").write_text(json.dumps({"model_type": "no_such_arch"}))
    one_line_before_ray(train(tmp_path, f"model.path={odd}", NO_RAY, fn_reward("nan_reward")),
                        "model.path", "no_such_arch")


def test_missing_lora_target_is_named(tmp_path):
    one_line_before_ray(train(tmp_path, "model.lora.enabled=true", "model.lora.target_modules=[q_proj,qkv_proj]",
                              NO_RAY, fn_reward("nan_reward")),
                        "model.lora.target_modules: qkv_proj not in the model", "q_proj")


def test_more_prompts_per_step_than_prompts(tmp_path):
    one_line_before_ray(train(tmp_path, "data.num_samples=20", "rl.prompts_per_step=64", "algorithm.mini_batch_size=8",
                              NO_RAY, fn_reward("nan_reward")),
                        "rl.prompts_per_step=64 is more than the")


@pytest.mark.parametrize("name,expected", [
    ("no_such_function", "cannot be imported"),
    ("string_reward", "returned str 'good' at row 0"),
    ("short_reward", "returned 1 scores for 2 responses"),
])
def test_unusable_reward_function_is_named(tmp_path, name, expected):
    one_line_before_ray(train(tmp_path, NO_RAY, fn_reward(name)), "reward.sources[0].path", expected)


def test_raising_reward_function_shows_the_users_frames(tmp_path):
    p = train(tmp_path, NO_RAY, fn_reward("raising_reward"))
    one_line_before_ray(p, "reward.sources[0].path", "raised ValueError: cannot score")
    assert 'rewards_for_tests.py", line' in p.stderr and "in _score" in p.stderr


def test_resume_without_a_checkpoint_refuses(tmp_path):
    one_line_before_ray(train(tmp_path, NO_RAY, fn_reward("nan_reward"), "--resume"),
                        "--resume: nothing to resume", "--resume=auto")


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
