"""`describe_failure`: whatever a step raised becomes one line naming the role, the step and the cause."""
from __future__ import annotations

import sys

import pytest
import ray.exceptions as rx

from rlhf_ray.errors import RunError, StepError, describe_failure, user_traceback
from rlhf_ray.roles.reward import FunctionSource, RewardSourceError


def _raise_in_user_code():
    exec(compile("def user_fn():\n    raise KeyError('label')\nuser_fn()\n", "/home/me/my_reward.py", "exec"), {})


def test_user_traceback_keeps_only_the_users_frames():
    try:
        _raise_in_user_code()
    except KeyError as e:
        text = user_traceback(e)
    assert '"/home/me/my_reward.py", line 2, in user_fn' in text and "KeyError: 'label'" in text
    # this test file lies outside rlhf_ray, so it is "user code" and stays; the frame inside rlhf_ray goes
    assert "test_errors.py" in text and "in _raise_in_user_code" in text
    assert "rlhf_ray/" not in text


def test_user_traceback_drops_the_frames_inside_rlhf_ray(tmp_path, monkeypatch):
    """A reward function called by `FunctionSource.__call__` (a frame in rlhf_ray/roles/reward.py) fails:
    the operator sees their own frame and not ours."""
    (tmp_path / "my_reward_tb.py").write_text("def f(prompts, responses):\n    raise KeyError('label')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_reward_tb", raising=False)
    with pytest.raises(RewardSourceError) as caught:
        FunctionSource("my_reward_tb:f")(["p"], ["r"])
    text = caught.value.detail
    assert f'"{tmp_path / "my_reward_tb.py"}", line 2, in f' in text and "KeyError: 'label'" in text
    assert "rlhf_ray/" not in text and "in __call__" not in text


def test_operator_error_keeps_its_detail_and_gains_the_step():
    err = describe_failure(RunError("reward function:m:f raised ValueError: x", detail="  File ..."), step=4)
    assert isinstance(err, StepError) and str(err) == "step 4: RunError: reward function:m:f raised ValueError: x"
    assert err.detail == "  File ..."


def test_dead_actor_is_named_with_the_last_checkpoint():
    dead = rx.ActorDiedError()
    dead.actor_id = "ab" * 16
    err = describe_failure(dead, step=7, names={"ab" * 16: "policy learner rank 1"}, last_checkpoint="/r/step_000006")
    line = str(err)
    assert line.startswith("step 7, policy learner rank 1: the policy learner rank 1 process died")
    assert "last good checkpoint: /r/step_000006" in line and "--resume=auto" in line
    assert "\n" not in line


def test_bug_is_one_line_too():
    err = describe_failure(IndexError("list index out of range"), step=2)
    assert str(err) == "step 2: IndexError: list index out of range"


def test_actor_that_failed_to_start_is_named():
    died = rx.ActorDiedError()
    died._actor_init_failed = True
    died.error_msg = ("The actor died because of an error raised in its creation task, ray::RewardActor.__init__()\n"
                      "  File x\nrlhf_ray.roles.reward.RewardSourceError: reward function 'm:f' cannot be imported")
    line = str(describe_failure(died, step=0))
    assert line == ("start-up, reward: the reward failed to start: rlhf_ray.roles.reward.RewardSourceError: "
                    "reward function 'm:f' cannot be imported")
