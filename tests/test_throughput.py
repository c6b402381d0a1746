"""The generator throughput the controller reports and the console prints, lockstep and overlapped
(`rollout.sync.max_off_policy_lag=1`), with in-process fake roles (no Ray, no models)."""
import time

import pytest
import torch

from rlhf_ray.config import load_config
from rlhf_ray.data.prompts import Prompt
from rlhf_ray.records import Rollout
from rlhf_ray.rl.controller import RLController, StepConfig, tokens_per_s
from rlhf_ray.rl.prompt_stream import PromptStream
from rlhf_ray.records import UpdateResult
from rlhf_ray.sync.weight_sync import SyncStats, WeightSync
from rlhf_ray.tracking.console import format_step

ENGINE_S = 0.5  # what the fake engine reports having spent inside vLLM per rollout
TOKENS = 3      # tokens per response


class TimedRoles:
    """Every response is TOKENS tokens; a lockstep `generate` blocks for `wall_s`, an overlapped `submit`
    has finished by the time the driver asks (its result is immediate), as when it ran beside the update."""

    def __init__(self, wall_s: float = 0.0):
        self.version, self.wall_s = 0, wall_s   # version: the fake learner's updates
        self.weights = WeightSync(self, lambda: self.version)

    def push(self, version):  # the weight sync's transport: the engine serves `version` (`self.weights`)
        return SyncStats(version, 0.0, 0.0, None)

    def _rollout(self, prompt_ids, n):
        idx = [i for i in range(len(prompt_ids)) for _ in range(n)]
        resp = [[7] * TOKENS for _ in idx]
        return Rollout([list(prompt_ids[i]) for i in idx], resp, [[-1.0] * TOKENS for _ in idx],
                       [" x" * TOKENS for _ in idx], idx, ["length"] * len(idx), self.weights.version, 1.0, ENGINE_S)

    def generate(self, prompt_ids, n, step):
        time.sleep(self.wall_s)
        return self._rollout(prompt_ids, n)

    def submit(self, prompt_ids, n, step):
        rollout = self._rollout(prompt_ids, n)
        return type("Done", (), {"result": lambda _self: rollout})()

    def score(self, prompts, responses, finished, seq):
        return [float(i % 2) for i in range(len(responses))], torch.full(seq.response_mask.shape, -1.0), None, {}

    def update(self, batch, minibatches, kl_coef, overlapped=False):
        self.version += 1
        return UpdateResult({"policy/loss": 0.0}, None, 0.0)



def controller(roles, *overrides):
    cfg = load_config(None, ["rl.prompts_per_step=2", "rollout.n_samples_per_prompt=2", "algorithm.mini_batch_size=4",
                             "rl.steps=3", *overrides])
    stream = PromptStream([Prompt(f"p{i}", (1, 2 + i)) for i in range(4)], 2, seed=0)
    return RLController(StepConfig.of(cfg), roles, stream, pad_id=0)


def test_overlapped_rollout_rate_is_tokens_over_the_engines_time_not_the_drivers_wait():
    c = controller(TimedRoles(), "rollout.sync.max_off_policy_lag=1", "rollout.sync.check_every=10")
    first, second = c.step().metrics, c.step().metrics
    assert first["sync/overlapped"] == 1 and second["sync/lag"] == 1
    assert second["timing/generate_s"] < 0.05  # the driver barely waited: the rollout was already there
    tokens = 2 * 2 * TOKENS
    assert second["throughput/tokens_per_s"] == pytest.approx(tokens / ENGINE_S, rel=1e-6)


def test_lockstep_rate_counts_the_drivers_wall_time_when_it_exceeds_the_engines():
    roles = TimedRoles(wall_s=0.6)  # 0.1 s of hand-off beyond the engine's 0.5 s
    m = controller(roles).step().metrics
    assert m["timing/generate_s"] >= 0.6
    assert m["throughput/tokens_per_s"] == pytest.approx(2 * 2 * TOKENS / m["timing/generate_s"], rel=1e-6)


def test_tokens_per_s_takes_the_longer_of_wait_and_engine_time():
    assert tokens_per_s(100.0, 0.0, 2.0) == 50.0    # overlapped: the wait was nothing
    assert tokens_per_s(100.0, 4.0, 2.0) == 25.0    # lockstep: the driver saw the whole generation
    assert tokens_per_s(0.0, 0.0, 0.0) == 0.0


def test_console_labels_an_overlapped_generate_phase_as_a_wait():
    m = {"throughput/tokens_per_s": 24.0, "timing/generate_s": 0.01, "timing/update_s": 1.5}
    assert "[generate 0.01 update 1.50]" in format_step(m)
    assert "[gen-wait 0.01 update 1.50]" in format_step({**m, "sync/overlapped": 1.0})
    assert "tok/s 24" in format_step(m)
