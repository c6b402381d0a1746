"""The controller's dataflow and guards, with in-process fake roles (no Ray, no models)."""
import math

import pytest
import torch

from rlhf_ray.config import load_config
from rlhf_ray.data.prompts import Prompt
from rlhf_ray.generator.records import Rollout
from rlhf_ray.rl.advantage_step import BadRewardError
from rlhf_ray.rl.controller import EmptyResponseError, RLController
from rlhf_ray.rl.prompts import PromptStream
from rlhf_ray.sync.checks import LogprobMismatchError, StaleWeightsError


class FakeRoles:
    """Responses are 1-3 tokens; reward = response length; the 'learner' reports agreement from `drift`."""

    def __init__(self, n_tokens=(1, 2, 3), scores=None, drift=0.0, skip_sync=False):
        self.version, self.gen_version = 0, 0
        self.n_tokens, self.scores, self.drift, self.skip_sync = n_tokens, scores, drift, skip_sync
        self.updates = []
        self.submitted = []

    def policy_version(self):
        return self.version

    def generate(self, prompt_ids, n, step):
        resp, idx = [], []
        for i, _ in enumerate(prompt_ids):
            for j in range(n):
                resp.append([7] * self.n_tokens[(i + j) % len(self.n_tokens)])
                idx.append(i)
        return Rollout([list(prompt_ids[i]) for i in idx], resp, [[-1.0] * len(r) for r in resp],
                       [" x" * len(r) for r in resp], idx, ["stop"] * len(resp), self.gen_version, 1.0)

    def submit(self, prompt_ids, n, step):
        rollout = self.generate(prompt_ids, n, step)
        self.submitted.append(step)
        return type("Pending", (), {"result": lambda _self: rollout})()

    def score(self, prompts, responses, seq):
        scores = self.scores if self.scores is not None else [float(len(r) // 2) for r in responses]
        return list(scores), torch.full(seq.response_mask.shape, -1.0), None, {}

    def update(self, batch, minibatches, kl_coef, overlapped=False):
        self.updates.append((batch, minibatches))
        self.version += 1
        return {"policy/loss": 0.1, "sync/logprob_max_abs": self.drift, "sync/logprob_mean_abs": self.drift,
                "sync/logprob_num_tokens": 10.0}

    def sync_weights(self):
        if not self.skip_sync:
            self.gen_version = self.version
        return self.version, {}


def make(roles, *overrides, prompts=4):
    cfg = load_config(None, ["rl.prompts_per_step=2", "rollout.n_samples_per_prompt=3",
                             "algorithm.mini_batch_size=3", *overrides])
    stream = PromptStream([Prompt(f"p{i}", (1, 2 + i)) for i in range(prompts)], 2, seed=0)
    return RLController(cfg, roles, stream, pad_id=0)


def test_step_runs_the_dataflow_and_reports_phases():
    roles = FakeRoles()
    c = make(roles)
    out = c.step()
    m = out.metrics
    for phase in ("generate", "score", "advantage", "update", "sync"):
        assert f"timing/{phase}_s" in m
    assert m["sync/version"] == 1 and m["sync/lag"] == 0
    batch, minibatches = roles.updates[0]
    assert batch.advantages.shape == (6, 3)
    assert len(minibatches) == 1 and len(minibatches[0]) == 2  # 6 rows / mini-batch 3
    assert len(out.prompts) == 6 and out.prompts[0] == "p" + out.prompts[0][1:]


def test_a_skipped_sync_is_refused_on_the_next_step():
    c = make(FakeRoles(skip_sync=True))
    c.step()
    with pytest.raises(StaleWeightsError, match="was a weight sync skipped"):
        c.step()


def test_allowed_lag_accepts_one_step_old_rollouts():
    c = make(FakeRoles(skip_sync=True), "rollout.sync.max_off_policy_lag=1")
    c.step()
    assert c.step().metrics["sync/lag"] == 1


def test_overlap_samples_the_next_step_during_the_update_and_keeps_lockstep_checks():
    roles = FakeRoles()
    c = make(roles, "rollout.sync.max_off_policy_lag=1", "rollout.sync.check_every=3", "rl.steps=7")
    lags = [c.step().metrics["sync/lag"] for _ in range(7)]
    assert roles.submitted == [1, 2, 4, 5]  # steps 3 and 6 run in lockstep; nothing after the last step
    assert lags == [0, 1, 1, 0, 1, 1, 0]
    # the prompt stream is not skipped or repeated by prefetching
    ref = make(FakeRoles(), "rl.steps=7")
    assert [ref.step().prompts for _ in range(7)] != [] and ref.prompts.state_dict() == c.prompts.state_dict()


def test_logprob_mismatch_fails_loudly():
    c = make(FakeRoles(drift=1.0))
    with pytest.raises(LogprobMismatchError, match="weight version 0"):
        c.step()


def test_nan_reward_policies():
    nan_scores = [1.0, math.nan, 0.0, 1.0, 2.0, 0.0]
    with pytest.raises(BadRewardError):
        make(FakeRoles(scores=nan_scores)).step()
    roles = FakeRoles(scores=nan_scores)
    make(roles, "reward.on_nonfinite=drop_group").step()
    assert roles.updates[0][0].advantages.shape[0] == 3  # the group holding the NaN is gone
    roles = FakeRoles(scores=nan_scores)
    m = make(roles, "reward.on_nonfinite=zero").step().metrics
    assert m["reward/nonfinite"] == 1 and math.isfinite(m["reward/score_mean"])


def test_empty_responses():
    with pytest.raises(EmptyResponseError, match="responses are empty"):
        make(FakeRoles(n_tokens=(0, 1, 2)), "rollout.on_empty_response=error").step()
    m = make(FakeRoles(n_tokens=(0, 1, 2))).step().metrics
    assert m["response/empty_frac"] == pytest.approx(1 / 3)


def test_state_round_trip_reproduces_the_next_step():
    a = make(FakeRoles())
    a.step()
    state = a.state_dict()
    ref = a.step()
    b = make(FakeRoles())
    b.roles.version = b.roles.gen_version = 1
    b.load_state_dict(state)
    again = b.step()
    assert again.prompts == ref.prompts
    assert torch.equal(torch.cat(b.roles.updates[0][1][0]), torch.cat(a.roles.updates[1][1][0]))
