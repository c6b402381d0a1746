"""DAPO dynamic sampling through the controller, with in-process fake roles (no Ray, no models)."""
import torch

from rlhf_ray.config import load_config
from rlhf_ray.data.prompts import Prompt
from rlhf_ray.records import Rollout
from rlhf_ray.rl.controller import RLController, StepConfig
from rlhf_ray.rl.dynamic_sampling import informative_groups
from rlhf_ray.rl.prompt_stream import PromptStream
from rlhf_ray.records import UpdateResult
from rlhf_ray.sync.weight_sync import SyncStats, WeightSync


class SolvedPromptRoles:
    """Prompts whose id is even are 'solved': all n samples score 1. Odd ones score 0, 1, 0, ...
    Responses have 1 + (sample index % 3) tokens so merged rounds need re-padding."""

    def __init__(self):
        self.version, self.updates, self.generated = 0, [], []   # version: the fake learner's updates
        self.weights = WeightSync(self, lambda: self.version)

    def push(self, version):  # the weight sync's transport: the engine serves `version` (`self.weights`)
        return SyncStats(version, 0.0, 0.0, None)

    def generate(self, prompt_ids, n, step):
        self.generated.append([p[-1] for p in prompt_ids])
        idx = [i for i in range(len(prompt_ids)) for _ in range(n)]
        resp = [[7] * (1 + j % 3) for _ in prompt_ids for j in range(n)]
        return Rollout([list(prompt_ids[i]) for i in idx], resp, [[-0.5] * len(r) for r in resp],
                       ["x"] * len(resp), idx, ["stop"] * len(resp), self.weights.version, 1.0)

    def score(self, prompts, responses, finished, seq):
        scores = []
        for k, p in enumerate(prompts):
            solved = int(p[1:]) % 2 == 0
            scores.append(1.0 if solved else float(k % 2))
        return scores, torch.full(seq.response_mask.shape, -0.6) * seq.response_mask, None, {"time/score_s": 1.0}

    def update(self, batch, minibatches, kl_coef, overlapped=False):
        self.updates.append(batch)
        self.version += 1
        return UpdateResult({"policy/loss": 0.0}, None, 0.0)



def _controller(*overrides):
    cfg = load_config(None, ["rl.prompts_per_step=4", "rollout.n_samples_per_prompt=2",
                             "algorithm.mini_batch_size=8", *overrides])
    stream = PromptStream([Prompt(f"p{i}", (1, 100 + i)) for i in range(40)], 4, seed=0)
    return RLController(StepConfig.of(cfg), SolvedPromptRoles(), stream, pad_id=0)


def test_informative_groups():
    s = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.5, 0.5 + 1e-9, float("nan"), 1.0])
    assert informative_groups(s, 2).tolist() == [False, True, False, True]


def test_without_dynamic_sampling_solved_groups_are_trained_on():
    c = _controller()
    m = c.step().metrics
    batch = c.roles.updates[0]
    g = batch.advantages[:, 0].view(-1, 2)
    assert (g.abs().sum(1) == 0).any()  # some groups carry no signal
    assert "dynamic_sampling/dropped_groups" not in m


def test_dynamic_sampling_drops_all_equal_groups_and_refills_the_batch():
    c = _controller("algorithm.dynamic_sampling=true", "algorithm.dynamic_sampling_max_rounds=5")
    out = c.step()
    m, batch = out.metrics, c.roles.updates[0]
    assert len(batch.seq) == 8  # a full batch: 4 groups of 2
    g = batch.advantages[:, 0].view(-1, 2)
    assert (g.abs().sum(1) > 0).all()  # every group has signal
    assert all(int(p[1:]) % 2 == 1 for p in out.prompts)  # only unsolved prompts are left
    assert m["dynamic_sampling/dropped_groups"] >= 2 and m["dynamic_sampling/extra_rounds"] >= 1
    assert m["dynamic_sampling/kept_groups"] == 4
    assert len(c.roles.generated) == 1 + m["dynamic_sampling/extra_rounds"]
    # merged rounds keep the generator's log-probs aligned with the re-packed responses
    assert torch.equal(batch.old_logp, -0.5 * batch.seq.response_mask)


def test_dynamic_sampling_stops_at_the_round_cap():
    c = _controller("algorithm.dynamic_sampling=true", "algorithm.dynamic_sampling_max_rounds=0")
    m = c.step().metrics
    assert m["dynamic_sampling/extra_rounds"] == 0 and len(c.roles.generated) == 1
    assert len(c.roles.updates[0].seq) == 2 * m["dynamic_sampling/kept_groups"] < 8
