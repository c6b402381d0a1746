"""Multi-turn episodes in a real run (`rlhf-ray train`, vLLM + DeepSpeed + the calculator as a Ray actor): one run,
several claims (docs/TESTS.md, "Environments and tools"). `make test` runs GRPO colocated; the long tier the other
placement (engines, learner and reference in actors of their own) and PPO (GAE over an episode's policy tokens,
a critic)."""
import json
import os
from pathlib import Path

import pytest

from helpers import train

ENVS = str(Path(__file__).resolve().parents[1] / "envs")   # envs_for_tests, as a user's own module


@pytest.mark.slow
@pytest.mark.parametrize("placement,algorithm", [("colocated", "grpo"),
                                                 pytest.param("distributed", "grpo", marks=pytest.mark.long),
                                                 pytest.param("colocated", "ppo", marks=pytest.mark.long)])
def test_a_run_trains_on_multi_turn_episodes_with_a_tool_actor(tmp_path, monkeypatch, placement, algorithm):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [ENVS, os.environ.get("PYTHONPATH")])))
    out = tmp_path / "run"
    train(f"run.output_dir={out}", "run.stages=[rl]", "rl.steps=2", "rl.save_every=0", "rl.sample_every=1",
          "rl.eval_every=2", "data.rl_eval_prompts=2", "reward.sources=[]", "data.prompts=builtin:arith",
          "data.max_prompt_len=48", "rollout.max_new_tokens=40", "rollout.max_turns=3",
          "env.path=envs_for_tests:TwoToolTurns", "env.max_turn_tokens=6", "env.observation_template=' obs: {text}.'",
          "rl.prompts_per_step=2", "rollout.n_samples_per_prompt=2", "algorithm.mini_batch_size=4",
          f"cluster.placement={placement}", f"algorithm.name={algorithm}")
    rows = [json.loads(line) for line in (out / "rl" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "episode/turns" in r]
    assert len(steps) == 2
    for m in steps:
        # every episode took three turns: two answered by the calculator actor, the third ended by the environment
        assert m["episode/turns"] == 3 and m["episode/tool_calls"] == 2 and m["episode/done_frac"] == 1.0
        assert m["episode/env_tokens"] > 0 and m["episode/tool_errors"] == 0
        # the log-prob check ran on this step over the policy's tokens alone, and the engine's sampled log-probs
        # matched the learner's there (environment tokens, whose placeholders are 0.0, would not)
        assert m["sync/logprob_num_tokens"] == pytest.approx(4 * m["episode/policy_tokens"])
        assert m["sync/logprob_max_abs"] < 1e-3
        # the score is the environment's reward (no reward source): the last turn's length in characters
        assert m["reward/score_mean"] == pytest.approx(m["episode/reward"]) and m["episode/reward"] > 0
    evals = [r for r in rows if "eval/greedy_env_reward" in r]
    assert evals and "eval/sampled_tool_calls" in evals[-1]  # held-out evaluation runs episodes too
    samples = [json.loads(line) for line in (out / "rl" / "samples.jsonl").read_text().splitlines()]
    assert samples and all(s["episode"]["turns"] == 3 for s in samples)
    assert all(s["response"].count(" obs: obs 42.") == 2 for s in samples)  # whole episodes, the actor's answers
