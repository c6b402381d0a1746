"""Held-out evaluation of the policy during RL: prompts it never trains on, greedy and sampled.

Training reward is measured on the batch the policy just optimised, against the model it optimises, so it
rises even when the policy only learns to please the reward model. The held-out split and the gold judge
(`reward.gold`, never trained on) tell whether the policy improved on prompts it has not seen:

    eval/greedy_reward, eval/greedy_gold, eval/greedy_len     one greedy response per held-out prompt
    eval/sampled_reward, eval/sampled_gold, eval/sampled_len  rl.eval_samples at the rollout temperature

With an environment (`env.path`) each held-out sample is a whole episode, its score the sources' plus the
environment's reward, also reported alone (for the arithmetic task: the exact-answer accuracy):

    eval/greedy_env_reward, eval/greedy_tool_calls, eval/sampled_env_reward, eval/sampled_tool_calls

Runs before the first step (the baseline), every `rl.eval_every` steps and after the last step.
"""
from __future__ import annotations

import random
from typing import Callable, Optional, Sequence

import torch

from rlhf_ray.config import Config
from rlhf_ray.batch import pack_sequences

# generate(prompt_ids, n, temperature, seed[, max_new_tokens per prompt]) -> Rollout; temperature 0 is greedy
Generate = Callable[..., object]
# score(prompt_texts, responses, finished, seq) -> (scores, ...): the roles' scoring call
Score = Callable[..., tuple]
Gold = Callable[[list, list], Sequence[float]]


def split_prompts(prompts: list, cfg: Config) -> tuple[list, list]:
    """(train, held_out): `data.rl_eval_prompts` prompts drawn with the run seed, only when evaluation is on.

    Drawn at random rather than taken from the end, so a file sorted by topic still gives a fair sample.
    """
    k = cfg.data.rl_eval_prompts if cfg.rl.eval_every else 0
    if not k:
        return prompts, []
    if k >= len(prompts):
        from rlhf_ray.config import ConfigError
        raise ConfigError(f"data.rl_eval_prompts={k} leaves no training prompts out of {len(prompts)}; "
                          f"lower it or set rl.eval_every=0")
    held = set(random.Random(cfg.run.seed + 7).sample(range(len(prompts)), k))
    return [p for i, p in enumerate(prompts) if i not in held], [prompts[i] for i in sorted(held)]


class Evaluator:
    def __init__(self, prompts: list, cfg: Config, pad_id: int, gold: Optional[Gold] = None, episodes=None):
        """episodes: the run's `rlhf_ray.envs.episode.EpisodeRunner` when it has an environment."""
        self.prompts, self.pad_id, self.gold, self.episodes = prompts, pad_id, gold, episodes
        self.env_weight = cfg.env.reward_weight
        self.every, self.samples, self.last = cfg.rl.eval_every, cfg.rl.eval_samples, cfg.rl.steps
        self.temperature, self.seed = cfg.rollout.temperature, cfg.run.seed

    def due(self, step: int) -> bool:
        """Step 0 (before training), every `rl.eval_every` steps, and the last step."""
        return bool(self.every and self.prompts) and (step % self.every == 0 or step == self.last)

    def run(self, generate: Generate, score: Score, step: int) -> dict[str, float]:
        ids = [p.ids for p in self.prompts]
        out: dict[str, float] = {}
        # a fixed seed per step: the sampled numbers of two runs at the same step compare like for like
        for name, n, temp in (("greedy", 1, 0.0), ("sampled", self.samples, self.temperature)):
            seed = (self.seed * 7919 + step) % 2 ** 30
            if self.episodes is None:
                rollout, env = generate(ids, n, temp, seed), None
            else:
                env = self.episodes.run(lambda c, lim, s, t=temp: generate(c, 1, t, s, max_new_tokens=lim), ids,
                                        [p.row for p in self.prompts], n, seed)
                rollout = env.rollout
            texts = [self.prompts[i].text for i in rollout.prompt_index]
            seq = pack_sequences(rollout.prompt_ids, rollout.response_ids, self.pad_id, rollout.policy_mask)
            scores = torch.as_tensor(score(texts, list(rollout.texts), rollout.finished(), seq)[0],
                                     dtype=torch.float32)
            if env is not None:
                rewards = torch.as_tensor(env.rewards, dtype=torch.float32)
                scores = scores + self.env_weight * rewards
                out[f"eval/{name}_env_reward"] = float(rewards.mean())
                out[f"eval/{name}_tool_calls"] = env.metrics()["episode/tool_calls"]
            out[f"eval/{name}_reward"] = float(scores.mean())
            out[f"eval/{name}_len"] = float(seq.response_mask.sum(1).mean())
            if self.gold is not None:
                out[f"eval/{name}_gold"] = float(torch.as_tensor(list(self.gold(texts, list(rollout.texts)))).mean())
        return out


def format_eval(step: int, m: dict[str, float]) -> str:
    """One console line: `eval @ step 10  greedy reward +1.23 gold +0.45 len 12.0 | sampled ...`."""
    parts = []
    for name in ("greedy", "sampled"):
        fields = [f"{k} {m[f'eval/{name}_{k}']:+.3f}" for k in ("reward", "gold", "env_reward")
                  if f"eval/{name}_{k}" in m]
        fields.append(f"len {m[f'eval/{name}_len']:.1f}")
        parts.append(f"{name} " + " ".join(fields))
    return f"eval @ step {step:4d}  " + " | ".join(parts)
