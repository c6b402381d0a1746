"""Bad inputs that the CLI finds before Ray starts: each stops with exit 1 and one line naming the problem (plus
the user's own frames, if any), no traceback. Run in this process (`rlhf_ray.cli.main`), as the fast tier; the
ones found mid-run are in e2e/test_bad_inputs_cli.py."""
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from rlhf_ray.cli import main

HERE = Path(__file__).resolve().parent


@pytest.fixture(autouse=True)
def _test_rewards_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(HERE / "e2e"))  # rewards_for_tests, as a user's own module


def train(tmp_path, capsys, *args):
    code = main(["train", str(HERE.parent / "configs" / "quickstart.yaml"), f"run.output_dir={tmp_path}", "run.stages=[rl]", "rl.steps=2",
                 "rl.save_every=0", *args])
    return SimpleNamespace(returncode=code, stderr=capsys.readouterr().err)


def test_long_prompt_is_named_before_any_actor_starts(tmp_path, capsys):
    # cluster.address points at nothing (NO_RAY below): a run that got as far as Ray would fail there instead
    p = train(tmp_path, capsys, "data.max_prompt_len=3", "data.on_long_prompt=error", "run.stages=[rl]",
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


def test_folder_without_a_model_is_named(tmp_path, capsys):
    empty = tmp_path / "not_a_model"
    empty.mkdir()
    one_line_before_ray(train(tmp_path, capsys, f"model.path={empty}", NO_RAY, fn_reward("nan_reward")),
                        "model.path", str(empty), "holds no model (no config.json)")


def test_unknown_architecture_is_named(tmp_path, capsys):
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.json").write_text(json.dumps({"model_type": "no_such_arch"}))
    one_line_before_ray(train(tmp_path, capsys, f"model.path={odd}", NO_RAY, fn_reward("nan_reward")),
                        "model.path", "no_such_arch")


def test_missing_lora_target_is_named(tmp_path, capsys):
    one_line_before_ray(train(tmp_path, capsys, "model.lora.enabled=true", "model.lora.target_modules=[q_proj,qkv_proj]",
                              NO_RAY, fn_reward("nan_reward")),
                        "model.lora.target_modules: qkv_proj not in the model", "q_proj")


def test_more_prompts_per_step_than_prompts(tmp_path, capsys):
    one_line_before_ray(train(tmp_path, capsys, "data.num_samples=20", "rl.prompts_per_step=64", "algorithm.mini_batch_size=8",
                              NO_RAY, fn_reward("nan_reward")),
                        "rl.prompts_per_step=64 is more than the")


@pytest.mark.parametrize("name,expected", [
    ("no_such_function", "cannot be imported"),
    ("string_reward", "returned str 'good' at row 0"),
    ("short_reward", "returned 1 scores for 2 responses"),
])
def test_unusable_reward_function_is_named(tmp_path, capsys, name, expected):
    one_line_before_ray(train(tmp_path, capsys, NO_RAY, fn_reward(name)), "reward.sources[0].path", expected)


def test_raising_reward_function_shows_the_users_frames(tmp_path, capsys):
    p = train(tmp_path, capsys, NO_RAY, fn_reward("raising_reward"))
    one_line_before_ray(p, "reward.sources[0].path", "raised ValueError: cannot score")
    assert 'rewards_for_tests.py", line' in p.stderr and "in _score" in p.stderr


def test_resume_without_a_checkpoint_refuses(tmp_path, capsys):
    one_line_before_ray(train(tmp_path, capsys, NO_RAY, fn_reward("nan_reward"), "--resume"),
                        "--resume: nothing to resume", "--resume=auto")
