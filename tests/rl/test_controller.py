"""The controller's dataflow and guards, with in-process fake roles (no Ray, no models)."""
import math

import pytest
import torch

from rlhf_ray.config import load_config
from rlhf_ray.data.prompts import Prompt
from rlhf_ray.records import Rollout
from rlhf_ray.rl.advantage_step import BadRewardError
from rlhf_ray.rl.controller import EmptyResponseError, RLController, StepConfig, generation_seed
from rlhf_ray.rl.prompt_stream import PromptStream
from rlhf_ray.records import UpdateResult
from rlhf_ray.sync.checks import Agreement, LogprobMismatchError, StaleWeightsError
from rlhf_ray.sync.weight_sync import SyncStats, WeightSync


class FakeRoles:
    """Responses are 1-3 tokens; reward = response length; the 'learner' reports agreement from `drift`.

    The generator samples every token at log-prob -1; the reference scores it at -1 - `ref_gap`, so the
    per-token KL (k1 = log pi_old - log pi_ref) is exactly `ref_gap`.

    Versions are counted as the real placements count them: the learner counts its optimizer steps (one per
    minibatch of every PPO epoch), and the product's own `WeightSync` counts pushes, with this object as its
    transport (`skip_sync`: a transport that reports a push but leaves the engine on its old weights)."""

    def __init__(self, n_tokens=(1, 2, 3), scores=None, drift=0.0, skip_sync=False, ref_gap=0.0, limit=None):
        """limit: responses of this many tokens end at the generation limit (finish reason "length")."""
        self.optimizer_steps, self.gen_version = 0, 0
        self.limit, self.finished = limit, []
        self.n_tokens, self.scores, self.drift, self.skip_sync = n_tokens, scores, drift, skip_sync
        self.ref_gap = ref_gap
        self.updates = []
        self.kl_coefs = []
        self.submitted = []
        self.weights = WeightSync(self, lambda: self.optimizer_steps)

    def generate(self, prompt_ids, n, seed):
        resp, idx = [], []
        for i, _ in enumerate(prompt_ids):
            for j in range(n):
                resp.append([7] * self.n_tokens[(i + j) % len(self.n_tokens)])
                idx.append(i)
        return Rollout([list(prompt_ids[i]) for i in idx], resp, [[-1.0] * len(r) for r in resp],
                       [" x" * len(r) for r in resp], idx, ["length" if len(r) == self.limit else "stop" for r in resp],
                       self.gen_version, 1.0)

    def submit(self, prompt_ids, n, seed):
        rollout = self.generate(prompt_ids, n, seed)
        self.submitted.append(seed)
        return type("Pending", (), {"result": lambda _self: rollout})()

    def score(self, prompts, responses, finished, seq):
        self.finished.append([(len(r) // 2, f) for r, f in zip(responses, finished)])  # (tokens, finished)
        scores = self.scores if self.scores is not None else [float(len(r) // 2) for r in responses]
        return list(scores), torch.full(seq.response_mask.shape, -1.0 - self.ref_gap), None, {}

    def update(self, batch, minibatches, kl_coef, overlapped=False):
        self.updates.append((batch, minibatches))
        self.kl_coefs.append(kl_coef)
        self.optimizer_steps += sum(len(epoch) for epoch in minibatches)
        return UpdateResult({"policy/loss": 0.1}, Agreement(self.drift, self.drift, 10), 0.0)

    def push(self, version):  # the transport
        if not self.skip_sync:
            self.gen_version = version
        return SyncStats(version, 0.0, 0.0, None)


def make(roles, *overrides, prompts=4):
    cfg = load_config(None, ["rl.prompts_per_step=2", "rollout.n_samples_per_prompt=3",
                             "algorithm.mini_batch_size=3", *overrides])
    stream = PromptStream([Prompt(f"p{i}", (1, 2 + i)) for i in range(prompts)], 2, seed=0)
    return RLController(StepConfig.of(cfg), roles, stream, pad_id=0)


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
    assert sorted(torch.cat(minibatches[0]).tolist()) == list(range(6))  # every row once per epoch
    # each row's prompt text is the prompt whose ids the row carries (prompt "pK" has ids (1, 2 + K))
    real = batch.seq.attention_mask[:, :batch.seq.prompt_len].bool()
    ids = [batch.seq.input_ids[i, :batch.seq.prompt_len][real[i]].tolist() for i in range(6)]
    assert out.prompts == [f"p{row[1] - 2}" for row in ids]
    assert out.prompts[0] == out.prompts[2] != out.prompts[3] == out.prompts[5]  # 2 prompts x 3 samples
    # responses of 1, 2, 3 tokens in each group; the fake reward (len(text) // 2) is their token count
    assert batch.seq.response_mask.sum(1).tolist() == [1.0, 2.0, 3.0, 2.0, 3.0, 1.0]
    assert out.scores == [1.0, 2.0, 3.0, 2.0, 3.0, 1.0]


def test_the_scorers_are_told_which_responses_the_generation_limit_cut():
    roles = FakeRoles(limit=3)
    make(roles).step()
    (rows,) = roles.finished
    assert len(rows) == 6 and all(finished == (tokens != 3) for tokens, finished in rows)
    assert {f for _, f in rows} == {True, False}


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
    outs = [c.step() for _ in range(7)]
    # steps 3 and 6 run in lockstep; nothing after the last step; each sampled with its own step's seed
    assert roles.submitted == [generation_seed(0, s) for s in (1, 2, 4, 5)]
    assert [o.metrics["sync/lag"] for o in outs] == [0, 1, 1, 0, 1, 1, 0]
    assert [o.metrics["sync/overlapped"] for o in outs] == [1, 1, 0, 1, 1, 0, 0]
    # the prompt stream is not skipped or repeated by prefetching: the same prompts, step by step, as in lockstep
    ref = make(FakeRoles(), "rl.steps=7", prompts=5)
    c2 = make(FakeRoles(), "rollout.sync.max_off_policy_lag=1", "rollout.sync.check_every=3", "rl.steps=7",
              prompts=5)
    assert [ref.step().prompts for _ in range(7)] == [c2.step().prompts for _ in range(7)]
    assert ref.prompts.state_dict() == c2.prompts.state_dict()


class EngineDiesInOverlap(FakeRoles):
    """Submissions number `die_at` (1-based) die: `.result()` raises RayActorError, as an overlapped rollout's does
    when a generator engine's process is killed while it samples beside the update."""

    def __init__(self, die_at=(2,), **kw):
        super().__init__(**kw)
        self.die_at = die_at

    def submit(self, prompt_ids, n, seed):
        pending = super().submit(prompt_ids, n, seed)
        if len(self.submitted) not in self.die_at:
            return pending

        def dead(_self):
            from ray.exceptions import RayActorError
            raise RayActorError(error_msg="the generator engine's process died (killed in the test)")
        return type("Pending", (), {"result": dead})()


def test_an_engine_that_dies_in_an_overlapped_rollout_is_asked_again_once_with_the_same_prompts_and_seed():
    """Lag-1 overlap: the rollout sampled beside step 2's update dies with its engine. Step 3 samples the same
    prompts from the same seed again (now after the push: lag 0) and the run trains the lockstep run's prompts,
    none lost, none doubled. A second death of the same rollout is the run's failure."""
    over = ("rollout.sync.max_off_policy_lag=1", "rl.steps=6")
    roles = EngineDiesInOverlap(die_at=(2,))
    c = make(roles, *over, prompts=5)
    outs = [c.step() for _ in range(6)]
    lockstep = make(FakeRoles(), "rl.steps=6", prompts=5)
    assert [o.prompts for o in outs] == [lockstep.step().prompts for _ in range(6)]
    assert roles.submitted == [generation_seed(0, s) for s in (1, 2, 2, 3, 4, 5)]  # step 2's seed asked twice
    assert [o.metrics["sync/lag"] for o in outs] == [0, 1, 0, 1, 1, 1]
    assert [o.metrics["sync/version"] for o in outs] == [1, 2, 3, 4, 5, 6]
    from ray.exceptions import RayActorError
    c = make(EngineDiesInOverlap(die_at=(1, 2)), *over)
    c.step()
    with pytest.raises(RayActorError):
        c.step()


def test_several_optimizer_steps_per_rl_step_keep_the_lag_in_rl_steps():
    """PPO epochs x minibatches optimizer steps per RL step (here 2 x 2), rollouts one step behind: each step
    pushes once, so the versions count steps and an overlapped rollout lags by exactly 1 (a version that
    counted optimizer steps stopped this run at step 2 with StaleWeightsError, lag 4 > 1)."""
    roles = FakeRoles()
    c = make(roles, "rollout.sync.max_off_policy_lag=1", "rollout.sync.check_every=3", "algorithm.ppo_epochs=2",
             "rl.steps=6")
    outs = [c.step() for _ in range(6)]
    assert [len(e) for _, mbs in roles.updates for e in mbs] == [2] * 12  # 2 epochs of 2 minibatches a step
    assert roles.optimizer_steps == 24
    assert [o.metrics["sync/version"] for o in outs] == [1, 2, 3, 4, 5, 6]
    assert [o.metrics["sync/lag"] for o in outs] == [0, 1, 1, 0, 1, 1]


def test_a_step_whose_updates_were_all_refused_pushes_nothing():
    """learner.on_nonfinite=skip can refuse every optimizer step of an update: the weights did not change, so
    no push, no new version, and the next rollout is not counted as lagging."""
    roles = FakeRoles()
    c = make(roles)
    c.step()
    roles.update = lambda batch, minibatches, kl_coef, overlapped=False: UpdateResult(
        {"policy/nonfinite_skipped": 1.0}, Agreement(0.0, 0.0, 10), 0.0)
    m = c.step().metrics
    assert m["sync/version"] == 1 and roles.gen_version == 1 and "sync/total_s" not in m
    assert c.step().metrics["sync/lag"] == 0


def test_logprob_mismatch_fails_loudly():
    c = make(FakeRoles(drift=1.0))
    with pytest.raises(LogprobMismatchError, match="weight version 0"):
        c.step()


def test_a_lockstep_mismatch_over_the_bound_is_corrected_only_by_a_named_preset_and_said(caplog):
    with pytest.raises(LogprobMismatchError, match="on_logprob_mismatch=correct"):
        make(FakeRoles(drift=1.0), "algorithm.is_correction=icepop").step()  # a preset alone decides nothing
    c = make(FakeRoles(drift=1.0), "algorithm.is_correction=icepop", "rollout.sync.on_logprob_mismatch=correct")
    with caplog.at_level("WARNING", logger="rlhf_ray.rl.controller"):
        m = c.step().metrics
    assert m["sync/logprob_over_bound"] == 1.0
    assert "corrected by algorithm.is_correction=icepop" in caplog.text
    assert make(FakeRoles(drift=0.0)).step().metrics["sync/logprob_over_bound"] == 0.0


def test_nan_reward_policies():
    nan_scores = [1.0, math.nan, 0.0, 1.0, 2.0, 0.0]
    with pytest.raises(BadRewardError, match=r"reward is NaN or infinite for 1 of 6 responses \(rows \[1\]\)"):
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
    b.load_state_dict(state)  # as the RL stage does after loading a checkpoint: the engine serves version 1
    assert b.roles.gen_version == 1 and b.roles.weights.version == 1
    again = b.step()
    assert again.prompts == ref.prompts
    assert torch.equal(torch.cat(b.roles.updates[0][1][0]), torch.cat(a.roles.updates[1][1][0]))


def test_kl_to_the_reference_shapes_the_rewards():
    # Every group scores 1.0 for all its samples, so without a KL term GRPO's advantages are all zero.
    # With the KL in the reward, a longer response pays more KL (0.5 per token) and gets a lower advantage.
    flat = [1.0] * 6
    roles = FakeRoles(scores=flat, ref_gap=0.5)
    m = make(roles, "reference.kl_coef=0.1", "reference.kl_in_reward=true", "reference.kl_kind=k1").step().metrics
    assert m["kl/mean"] == pytest.approx(0.5) and m["kl/seq_mean"] == pytest.approx(0.5 * 2)
    adv = roles.updates[0][0].advantages
    lengths = roles.updates[0][0].seq.response_mask.sum(1)
    per_row = adv.sum(1) / lengths
    assert per_row[lengths == 1].min() > 0 > per_row[lengths == 3].max()
    # KL as a loss term instead (kl_in_reward=false): the rewards carry only the score, the learner gets beta
    roles = FakeRoles(scores=flat, ref_gap=0.5)
    make(roles, "reference.kl_coef=0.1", "reference.kl_in_reward=false", "reference.kl_kind=k3").step()
    assert torch.count_nonzero(roles.updates[0][0].advantages) == 0 and roles.kl_coefs == [0.1]
    # no gap to the reference: no shaping at all
    roles = FakeRoles(scores=flat)
    make(roles, "reference.kl_coef=0.1").step()
    assert torch.count_nonzero(roles.updates[0][0].advantages) == 0


def test_adaptive_kl_follows_the_measured_kl_and_survives_a_resume():
    # KL per sequence = 0.5 x mean length 2 = 1.0, twice the target: beta grows by the clipped error 0.2
    # times 6 samples / horizon 60 each step (Ziegler 2019, in log space): 0.1 -> 0.1 e^0.02 -> 0.1 e^0.04.
    over = ("reference.adaptive_kl=true", "reference.kl_coef=0.1", "reference.kl_target=0.5", "reference.kl_kind=k1",
            "reference.kl_in_reward=true",
            "reference.kl_horizon=60")
    roles = FakeRoles(ref_gap=0.5)
    a = make(roles, *over)
    coefs = [a.step().metrics["kl/coef"] for _ in range(2)]
    up = [0.1 * math.exp(0.02), 0.1 * math.exp(0.04)]
    assert coefs == pytest.approx(up, rel=1e-9)
    assert roles.kl_coefs == pytest.approx([0.1, up[0]], rel=1e-9)  # the learner trains with the current beta
    b = make(FakeRoles(ref_gap=0.5), *over)
    b.load_state_dict(a.state_dict())
    b.step()
    assert b.roles.kl_coefs == pytest.approx([up[1]], rel=1e-9)
    # below a target it has never reached, beta holds (the KL of a run climbs from 0 whatever beta is)
    low = make(FakeRoles(ref_gap=0.1), *over)
    assert [low.step().metrics["kl/coef"] for _ in range(2)] == [0.1, 0.1]
