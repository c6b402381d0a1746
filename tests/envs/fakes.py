"""A scripted engine and in-process roles for the episode loop and the controller (no Ray, no models)."""
import torch

from rlhf_ray.records import Rollout, UpdateResult
from rlhf_ray.sync.checks import Agreement
from rlhf_ray.sync.weight_sync import SyncStats, WeightSync


def token_logprob(position: int, token: int) -> float:
    """The scripted engine's log-prob of `token` sampled at context length `position`: distinct per token, so a
    shifted or misaligned log-prob is seen."""
    return -0.01 * ((position * 31 + token) % 97) - 0.01


class ScriptedEngine:
    """Turn k (counted per call) samples `turns[k]` for every context (or `turns[k](i)` for context i), cut to
    that context's limit. Records
    every call's contexts and limits."""

    def __init__(self, turns, decode=lambda ids: " ".join(map(str, ids)), version=0):
        self.turns, self.decode, self.version = turns, decode, version
        self.calls = []

    def __call__(self, contexts, limits, seed):
        self.calls.append(([list(c) for c in contexts], list(limits), seed))
        script = self.turns[(len(self.calls) - 1) % len(self.turns)]
        # an entry may be a function of the context's index: samples that differ (and so do their rewards)
        ids = [list(script(k) if callable(script) else script)[:lim] for k, lim in enumerate(limits)]
        lps = [[token_logprob(len(c) + j, t) for j, t in enumerate(r)] for c, r in zip(contexts, ids)]
        return Rollout([list(c) for c in contexts], ids, lps, [self.decode(r) for r in ids],
                       list(range(len(contexts))), ["stop"] * len(ids), self.version, 1.0, 0.01)


class EnvRoles:
    """The controller's role graph over a `ScriptedEngine`: reference log-probs = the engine's own (KL 0); the
    update records its batch and reports the agreement the product computes on it."""

    def __init__(self, engine):
        self.engine, self.optimizer_steps, self.updates = engine, 0, []
        self.weights = WeightSync(self, lambda: self.optimizer_steps)

    def generate(self, prompt_ids, n, seed, max_new_tokens=None):
        assert n == 1, "episodes sample one continuation per context"
        limits = max_new_tokens or [64] * len(prompt_ids)
        self.engine.version = self.weights.version
        return self.engine(prompt_ids, limits, seed)

    def score(self, prompts, responses, finished, seq):
        return [0.0] * len(prompts), torch.zeros(seq.response_mask.shape), None, {}

    def update(self, batch, minibatches, kl_coef, overlapped=False):
        self.updates.append(batch)
        self.optimizer_steps += sum(len(e) for e in minibatches)
        return UpdateResult({"policy/loss": 0.0}, Agreement(0.0, 0.0, 1), 0.0)

    def push(self, version):
        return SyncStats(version, 0.0, 0.0, None)
