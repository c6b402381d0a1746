"""The built-in tasks, their environments and verifiable rewards; user environments refused with one line
before Ray starts."""
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from rlhf_ray.cli import main
from rlhf_ray.envs import arith, code
from rlhf_ray.envs.base import EnvError, Reply
from rlhf_ray.envs.loader import env_factory, load_env_class, probe
from rlhf_ray.envs.rewards import exact_answer, last_number
from rlhf_ray.envs.rewards import tests_pass as passes
from rlhf_ray.envs.sandbox import Limits
from rlhf_ray.envs.tools import Calculator, PythonExecutor, evaluate

HERE = Path(__file__).resolve().parent
FAST = Limits(timeout_s=10.0, memory_mb=256, output_bytes=512)  # generous: a loaded machine starts Python slowly


def test_exact_answer_reads_the_last_number():
    assert exact_answer("so 37 + 48 = 85", "85") == 1.0 and exact_answer("85.0", 85) == 1.0
    assert exact_answer("1,234 apples", "1234") == 1.0 and exact_answer("85 or 86", "85") == 0.0
    assert exact_answer("no idea", "85") == 0.0 and last_number("-3.5 left") == -3.5


def test_tests_pass_runs_the_code_and_its_asserts_in_the_sandbox():
    run = PythonExecutor(FAST)
    assert passes("def add(a, b):\n    return a + b", "assert add(2, 3) == 5", run)[0] == 1.0
    score, result = passes("def add(a, b):\n    return a - b", "assert add(2, 3) == 5", run)
    assert score == 0.0 and "AssertionError" in result.text
    hang = PythonExecutor(Limits(timeout_s=0.5, memory_mb=256, output_bytes=512))
    assert passes("def add(a, b):\n    while True: pass", "assert add(2, 3) == 5", hang)[0] == 0.0


def test_arithmetic_rows_come_from_the_seed_and_their_answers_are_right():
    rows = arith.prompt_rows(50, seed=3)
    assert rows == arith.prompt_rows(50, seed=3) and rows != arith.prompt_rows(50, seed=4)
    for r in rows:
        assert str(evaluate(r["expression"])) == r["answer"] and int(r["answer"]) > 0
        assert "<calc>" in r["prompt"]


def test_the_arithmetic_environment_calls_the_calculator_then_scores_the_answer():
    row = {"prompt": "q", "answer": "85", "expression": "37 + 4 * 12"}
    env = arith.ArithEnv({"calculator": Calculator()})
    env.reset(row)
    tool = env.step("Let me compute. <calc>37 + 4 * 12</calc>")
    assert tool == Reply("tool", "<result>85</result>", tool_calls=1)
    assert env.step("85").reward == 1.0 and env.step("84").reward == 0.0
    bad = env.step("<calc>37 +</calc>")
    assert bad.tool_errors == 1 and "SyntaxError" in bad.text
    no_tool = arith.ArithEnv({})  # the same task without the tool: a call is just a wrong answer
    no_tool.reset(row)
    assert no_tool.step("<calc>37 + 4 * 12</calc>") == Reply("done", reward=0.0)


def test_the_code_environment_answers_failing_tests_and_ends_on_passing_ones():
    row = code.prompt_rows(1, seed=0)[0]
    env = code.CodeEnv({"python": PythonExecutor(FAST)})
    env.reset(row)
    wrong = env.step("```python\ndef add(a, b):\n    return 0\n\ndef scale(xs, k):\n    return []\n"
                     "def largest(xs):\n    return 0\n```")
    assert wrong.kind == "tool" and "The tests failed" in wrong.text and wrong.tool_errors == 1
    right = env.step("```python\ndef add(a, b):\n    return a + b\n\ndef scale(xs, k):\n    return [x * k for x in xs]\n"
                     "def largest(xs):\n    return max(xs)\n```")
    assert right == Reply("done", reward=1.0, tool_calls=1)


@pytest.mark.parametrize("spec, message", [
    ("builtin:chess", "unknown built-in environment 'builtin:chess'; built-ins: builtin:arith, builtin:code"),
    ("nosuchmodule:Env", "cannot be imported: No module named 'nosuchmodule'"),
    ("envs_for_tests:not_a_class", "is a int, not a class"),
    ("envs_for_tests:NoStep", "has no step method"),
    ("envs_for_tests", "is not builtin:NAME or module:Class"),
])
def test_an_environment_that_cannot_load_is_named(spec, message, monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))
    with pytest.raises(EnvError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_env_class(spec)


def test_the_probe_episode_catches_what_only_running_shows(monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))
    tools = {"calculator": Calculator()}
    probe("builtin:arith", tools, {"answer": "42"}, max_turns=2)
    probe("envs_for_tests:TwoToolTurns", tools, {}, max_turns=3)
    with pytest.raises(EnvError, match=r"reset\(row\) on the first prompt row raised KeyError: 'solution'"):
        probe("envs_for_tests:RaisesOnReset", tools, {}, max_turns=2)
    with pytest.raises(EnvError, match="returned dict, not rlhf_ray.envs.base.Reply"):
        probe("envs_for_tests:ReturnsADict", tools, {}, max_turns=2)
    with pytest.raises(EnvError, match="needs the python tool"):
        env_factory("builtin:code", tools)()


NO_RAY = "cluster.address=ray://127.0.0.1:1"  # a run that got as far as Ray would fail there instead


def train(tmp_path, capsys, *args):
    code_ = main(["train", str(HERE.parent.parent / "configs" / "quickstart.yaml"), f"run.output_dir={tmp_path}",
                  "run.stages=[rl]", "rl.steps=2", "rl.save_every=0", "reward.sources=[]", "data.prompts=builtin:arith",
                  "data.max_prompt_len=96", "rollout.max_turns=2", NO_RAY, *args])
    return SimpleNamespace(returncode=code_, stderr=capsys.readouterr().err)


def test_a_bad_environment_class_is_refused_before_ray_starts_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))
    p = train(tmp_path, capsys, "env.path=envs_for_tests:RaisesOnReset")
    assert p.returncode == 1, p.stderr[-2000:]
    assert "reset(row) on the first prompt row raised KeyError: 'solution'" in p.stderr, p.stderr[-2000:]
    assert "env.path" in p.stderr and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr[-2000:]
    p = train(tmp_path, capsys, "env.path=builtin:code", "env.tools=[calculator]")
    assert p.returncode == 1 and "needs the python tool" in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_env_keys_are_checked_with_the_config():
    from rlhf_ray.config import ConfigError, load_config
    with pytest.raises(ConfigError, match="rollout.max_turns=3 needs env.path"):
        load_config(None, ["rollout.max_turns=3"])
    with pytest.raises(ConfigError, match="max_off_policy_lag must be 0 with an environment"):
        load_config(None, ["env.path=builtin:arith", "rollout.sync.max_off_policy_lag=1"])
    with pytest.raises(ConfigError, match="env.tools"):
        load_config(None, ["env.path=builtin:arith", "env.tools=[shell]"])
    with pytest.raises(ConfigError, match="reward.sources is empty and env.path is unset"):
        load_config(None, ["reward.sources=[]"])
    json.dumps(load_config(None, ["env.path=builtin:arith"]).model_dump(mode="json"))
