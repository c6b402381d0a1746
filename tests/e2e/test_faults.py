"""Faults injected into a real run through the CLI: a role's process is SIGKILLed mid-run.

    generator engine killed   the run continues: Ray restarts it, it is re-synced, the step re-sampled
    reward actor killed       restarted once and its call retried: the run continues
    policy learner killed     one line naming the rank and the last good checkpoint; --resume=auto resumes
All three in one run (and its resume), which must log each step exactly once (none lost, none doubled). These runs use the distributed
placement, where each role is a process of its own that can die alone (colocated, one process holds them
all: its death is the learner-killed case).
"""
from __future__ import annotations

import re
import signal
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

from helpers import (SAME_AFTER_RESUME, finish, kill_during, rl_steps_logged, start_train,  # noqa: E402
                     training_rows)  # (tests/e2e is on the path)

HERE = str(Path(__file__).parent)  # rewards_for_tests, as a user's own module
STEPS = 4
ARGS = ["configs/quickstart.yaml", "run.stages=[rl]", "rl.init_from=builtin:tiny", f"rl.steps={STEPS}",
        "rl.save_every=2", "rl.sample_every=0", "logging.report=false", "logging.tensorboard=false",
        "reward.sources=[{kind: function, path: 'rlhf_ray.data.builtin_reviews:vader_reward'}]",
        "cluster.placement=distributed"]


# slow (the reward actor stays in `score` long enough to be killed there), and a NaN in every call: the run
# drops that response's group, as configured (a bad reward that is handled, not fatal)
SLOW_REWARD = ("reward.sources=[{kind: function, path: 'rewards_for_tests:slow_vader_one_nan'}]",
               "reward.on_nonfinite=drop_group")


def test_run_survives_its_generator_and_reward_actor_killed_then_a_killed_learner_resumes_exactly(tmp_path):
    """One run, three faults. The generator engine killed while it samples step 2 and the reward actor killed
    while it scores step 3 (a slow reward function keeps it in `score` long enough): the run goes on, nothing
    lost or doubled. Then the policy learner killed while it updates step 4 (step 3 logged, checkpoint at step
    2): one line naming the rank and the checkpoint; `--resume=auto` restores the learner and the engines from
    step 2, redoes step 3 exactly as before and finishes, every step logged once (the distributed placement's
    exact resume with full weights; test_train_cli.py's colocated GRPO run is the other placement's). Its
    reward function also returns one NaN a call, and `reward.on_nonfinite=drop_group` drops that group on
    every step."""
    proc = start_train(ARGS, tmp_path, *SLOW_REWARD, pythonpath=HERE)
    generator = kill_during(proc, tmp_path, "GeneratorActor.generate", after_step=1)
    reward = kill_during(proc, tmp_path, "RewardActor.score", after_step=2)
    assert generator != reward
    kill_during(proc, tmp_path, "PolicyRank.update", after_step=3)
    rc, err = finish(proc)
    lines = [x for x in err.splitlines() if x.startswith("rlhf-ray: error: ")]
    assert rc == 1 and len(lines) == 1, err[-3000:]
    assert re.search(r"step 4, policy learner rank 0: the policy learner rank 0 process died .*last good "
                     r"checkpoint: \S+/rl/checkpoints/step_000002 \(rerun with --resume=auto", lines[0]), lines[0]
    assert "Traceback" not in err
    before = training_rows(tmp_path / "rl")
    assert [r["step"] for r in before] == [1, 2, 3]  # the restarted roles lost no step, doubled none

    proc = start_train(ARGS, tmp_path, *SLOW_REWARD, "--resume=auto", pythonpath=HERE)
    rc, err = finish(proc)
    assert rc == 0, err[-3000:]
    assert rl_steps_logged(tmp_path) == list(range(1, STEPS + 1))  # nothing lost, nothing doubled
    after = training_rows(tmp_path / "rl")
    assert after[:2] == before[:2]  # the steps before the checkpoint were kept, not redone
    for key in SAME_AFTER_RESUME:  # step 3 again, from the step-2 checkpoint: the same as before the kill
        assert after[2][key] == pytest.approx(before[2][key], rel=1e-4, abs=1e-6), key
    # the generator serves the learner's weights after its restart (re-synced, not the initial ones)
    assert max(r["sync/logprob_max_abs"] for r in after if "sync/logprob_max_abs" in r) < 1e-3
    assert all(r["reward/nonfinite"] == 1 for r in after)  # the NaN's group dropped on every step, the run went on
    assert (tmp_path / "rl" / "model" / "config.json").exists()
