"""The episode loop: the policy and an environment take turns, token in and token out.

Each turn, every live episode's context (its prompt ids, then every token of the episode so far) goes to the
engines in ONE generate call (the controller's `roles.generate`, spread over the colocated ranks' engines or
the distributed group), one sample each. The token ids the engine sampled are kept as they are, with their
log-probs; the environment's reply is tokenized alone (`env.observation_template`) and appended after them.
The conversation is never rendered and tokenized again, so the ids the learner trains on are the ids the
engine sampled, whatever a chat template would make of the decoded text (verl #6501, trl #5224).

Budget: `rollout.max_new_tokens` bounds the whole episode after the prompt (policy and environment tokens),
so the engines' context length and the memory plan stay what they are for one turn; each turn may sample what
is left of it (at most `env.max_turn_tokens`). An episode ends when the environment says done, after `rollout.max_turns` policy turns, or when
the budget cannot hold another reply and turn.

    ids:         [turn 1 sampled][env reply 1][turn 2 sampled] ...      (T_b tokens)
    policy_mask: [1 ... 1       ][0 ...     0][1 ... 1       ] ...
    logprobs:    [sampled       ][0.0 ...   0][sampled       ] ...      (0.0 never read: masked)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

from rlhf_ray.envs.base import Environment, Reply, check_reply
from rlhf_ray.records import Rollout

# generate(contexts, max_new_tokens per context, seed) -> Rollout with one sample per context, in order
Generate = Callable[[list[list[int]], list[int], int], Rollout]


@dataclass(frozen=True)
class EpisodeStats:
    turns: int           # policy turns taken
    tool_calls: int
    tool_errors: int
    policy_tokens: int   # sampled by the engine (trained on)
    env_tokens: int      # written by the environment (masked)
    reward: float        # the environment's episode reward
    done: bool           # the environment ended it (False: cut by max_turns or the token budget)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Episodes:
    """B finished episodes: `rollout` has one row per episode (its `policy_mask` set), rewards and stats
    parallel to it."""
    rollout: Rollout
    rewards: list[float]
    stats: list[EpisodeStats]

    def metrics(self) -> dict[str, float]:
        """Means over the episodes (`episode/...`), and the share of tokens the environment wrote."""
        n = max(len(self.stats), 1)
        mean = (lambda key: sum(float(getattr(s, key)) for s in self.stats) / n)
        policy, env = mean("policy_tokens"), mean("env_tokens")
        calls = sum(s.tool_calls for s in self.stats)
        return {"episode/turns": mean("turns"), "episode/tool_calls": mean("tool_calls"),
                "episode/tool_errors": mean("tool_errors"), "episode/policy_tokens": policy,
                "episode/env_tokens": env, "episode/reward": mean("reward"), "episode/done_frac": mean("done"),
                "episode/env_token_frac": env / max(policy + env, 1e-9),
                "episode/tool_error_rate": sum(s.tool_errors for s in self.stats) / max(calls, 1)}


@dataclass
class _Live:
    """One episode while it runs (mutable; the loop's own)."""
    prompt_ids: list[int]
    prompt_index: int
    env: Environment
    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    turns: int = 0
    tool_calls: int = 0
    tool_errors: int = 0
    reward: float = 0.0
    done: bool = False
    over: bool = False
    finish: str = "length"


def turn_seed(seed: int, turn: int) -> int:
    """Turn t of a call seeded `seed`: reproducible per (step, turn), so a resumed run samples the same episodes."""
    return (seed + 104_729 * turn) % (2 ** 30)


class EpisodeRunner:
    def __init__(self, make_env: Callable[[], Environment], encode: Callable[[str], list[int]],
                 decode: Callable[[list[int]], str], *, max_turns: int, budget: int, template: str,
                 max_observation_tokens: int, max_turn_tokens: int | None = None, name: str = "env"):
        """make_env: a fresh environment per episode; encode: an observation's text -> ids (no special tokens
        added); decode: an episode's ids -> text (samples.jsonl); budget: rollout.max_new_tokens."""
        self.make_env, self.encode, self.decode, self.name = make_env, encode, decode, name
        self.max_turns, self.budget, self.template = max_turns, budget, template
        self.max_obs = max_observation_tokens
        self.max_turn = max_turn_tokens or budget

    def observation_ids(self, text: str) -> list[int]:
        """The reply as the policy reads it: the template around it, tokenized alone, cut to its limit."""
        return list(self.encode(self.template.format(text=text)))[:self.max_obs]

    def run(self, generate: Generate, prompt_ids: Sequence[Sequence[int]], rows: Sequence[dict], n: int,
            seed: int) -> Episodes:
        """n episodes per prompt (contiguous, as a Rollout's samples are); rows[i]: prompt i's dataset row."""
        eps = []
        for i, (ids, row) in enumerate(zip(prompt_ids, rows)):
            for _ in range(n):
                env = self.make_env()
                env.reset(dict(row))
                eps.append(_Live(list(ids), i, env))
        generate_s, temperature, versions = 0.0, 1.0, set()
        for turn in range(self.max_turns):
            live = [e for e in eps if not e.over]
            if not live:
                break
            out = generate([e.prompt_ids + e.ids for e in live],
                           [min(self.max_turn, self.budget - len(e.ids)) for e in live], turn_seed(seed, turn))
            generate_s += out.generate_s
            temperature = out.temperature
            versions.add(out.weight_version)
            for k, e in enumerate(live):
                self._take_turn(e, out.response_ids[k], out.response_logprobs[k], out.texts[k],
                                out.finish_reasons[k], last=turn + 1 == self.max_turns)
        if len(versions) != 1:  # the log-probs of one episode must all come from the weights it is trained against
            raise ValueError(f"an episode's turns were sampled with weight versions {sorted(versions)}")
        return self._collect(eps, generate_s, temperature, versions.pop())

    def _take_turn(self, e: _Live, ids: list[int], logprobs: list[float], text: str, finish: str, last: bool):
        room = min(self.max_turn, self.budget - len(e.ids))
        ids, logprobs = list(ids)[:room], list(logprobs)[:room]
        e.ids += ids
        e.logprobs += logprobs
        e.mask += [1] * len(ids)
        e.turns += 1
        e.finish = finish
        reply: Reply = check_reply(self.name, e.env.step(text))
        e.tool_calls += reply.tool_calls
        e.tool_errors += reply.tool_errors
        e.reward = float(reply.reward)
        if reply.kind == "done":
            e.done = e.over = True
            return
        obs = self.observation_ids(reply.text)
        # another turn needs the reply and at least one sampled token to fit the budget
        if last or len(e.ids) + len(obs) + 1 > self.budget:
            e.over = True
            return
        e.ids += obs
        e.logprobs += [0.0] * len(obs)
        e.mask += [0] * len(obs)

    def _collect(self, eps: list[_Live], generate_s: float, temperature: float, version: int) -> Episodes:
        rollout = Rollout(prompt_ids=[e.prompt_ids for e in eps], response_ids=[e.ids for e in eps],
                          response_logprobs=[e.logprobs for e in eps], texts=[self.decode(e.ids) for e in eps],
                          prompt_index=[e.prompt_index for e in eps], finish_reasons=[e.finish for e in eps],
                          weight_version=version, temperature=temperature, generate_s=generate_s,
                          policy_mask=[e.mask for e in eps])
        stats = [EpisodeStats(e.turns, e.tool_calls, e.tool_errors, sum(e.mask), len(e.mask) - sum(e.mask),
                              e.reward, e.done) for e in eps]
        return Episodes(rollout, [e.reward for e in eps], stats)
