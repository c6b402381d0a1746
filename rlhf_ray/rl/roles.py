"""The actor graph of an RL run, built from a Config, and the calls the controller makes on it.

    generator group (vLLM engines)    policy learner group (N ranks; reference too under LoRA)
    reward scorer                      reference scorer (full fine-tuning only)
    critic learner group (PPO only)

Each call fans out with `.remote` and gathers once, so roles that can work at the same time do.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import ray
import torch

from rlhf_ray.config import Config
from rlhf_ray.learner.group import LearnerGroup
from rlhf_ray.rl.actors import CriticRank, PolicyRank, ReferenceActor, RewardActor
from rlhf_ray.rl.batch import SequenceBatch
from rlhf_ray.utils.device import Backend


@dataclass(frozen=True)
class Paths:
    policy_init: str          # HF folder the policy (and reference) start from
    resolve: Callable[[str], str]  # resolves `stage:rm`, `builtin:...` and plain paths
    scratch: str              # run-local folder for files the roles hand each other


def sync_mode(cfg: Config) -> str:
    mode = cfg.rollout.sync.mode
    return ("adapter" if cfg.model.lora.enabled else "full") if mode == "auto" else mode


def split_rows(seq: SequenceBatch, n: int) -> list[SequenceBatch]:
    """n contiguous, equal shards of a batch (ZeRO-3 forwards are collectives: equal work per rank)."""
    if len(seq) % n:
        raise ValueError(f"a batch of {len(seq)} sequences does not split evenly over {n} ranks")
    k = len(seq) // n
    return [seq.select(slice(i * k, (i + 1) * k)) for i in range(n)]


def merge_update_stats(per_rank: list[dict[str, float]]) -> dict[str, float]:
    """Rank means (equal rows per rank), except the log-prob agreement: max of maxima, token-weighted mean."""
    out = {k: sum(s[k] for s in per_rank) / len(per_rank) for k in per_rank[0]}
    if "sync/logprob_max_abs" in out:
        tokens = [s["sync/logprob_num_tokens"] for s in per_rank]
        out["sync/logprob_max_abs"] = max(s["sync/logprob_max_abs"] for s in per_rank)
        out["sync/logprob_mean_abs"] = sum(s["sync/logprob_mean_abs"] * t for s, t in zip(per_rank, tokens)) / max(
            sum(tokens), 1.0)
        out["sync/logprob_num_tokens"] = sum(tokens)
    return out


class Roles:
    def __init__(self, cfg: Config, paths: Paths, backend: Backend, total_steps: int):
        from rlhf_ray.generator.group import GeneratorGroup
        self.cfg, self.backend = cfg, backend
        self.cores = cfg.cluster.torch_threads or os.cpu_count() or 1
        self.mode = sync_mode(cfg)
        norm_len = cfg.rollout.max_new_tokens
        common = dict(init_path=paths.policy_init, total_steps=total_steps, device=backend.device, seed=cfg.run.seed,
                      num_threads=self.cores, placement_strategy=cfg.cluster.placement_strategy)
        self.policy = LearnerGroup(cfg.model, cfg.rl.policy, kind="policy", rank_cls=PolicyRank, **common,
                                   rank_kwargs=dict(algo=cfg.algorithm, ref=cfg.reference,
                                                    temperature=cfg.rollout.temperature, norm_len=norm_len))
        self.critic = None
        if cfg.uses_critic:
            # rl.critic_init_from=stage:rm starts the critic from the reward model (InstructGPT): the RM's
            # score head is the value head (same Llama `score` layer), the backbone already judges responses
            critic_init = paths.resolve(cfg.rl.critic_init_from) if cfg.rl.critic_init_from else paths.policy_init
            self.critic = LearnerGroup(cfg.model, cfg.rl.critic, kind="value", rank_cls=CriticRank,
                                       **{**common, "init_path": critic_init},
                                       rank_kwargs=dict(algo=cfg.algorithm, norm_len=norm_len))
        self.reference = None  # under LoRA: the policy ranks with the adapter off, no second copy
        if not (cfg.model.lora.enabled and cfg.reference.path is None):
            ref_path = paths.resolve(cfg.reference.path or paths.policy_init)
            self.reference = ReferenceActor.options(num_cpus=0.5).remote(
                ref_path, dtype=backend.dtype, device=backend.device, temperature=cfg.rollout.temperature)
        self.reward = RewardActor.options(num_cpus=cfg.reward.num_cpus, num_gpus=cfg.reward.num_gpus).remote(
            cfg.reward, resolve_path=paths.resolve, device=backend.device)
        self.generator = GeneratorGroup.from_config(cfg, self._generator_base(cfg, paths))
        self.generator_threads = max(1, int(cfg.rollout.cpus_per_engine))

    def _generator_base(self, cfg: Config, paths: Paths) -> str:
        """The weights the generator starts from. With a 4-bit (QLoRA) learner that is the learner's own
        dequantized NF4 base, not the original checkpoint: otherwise generator and learner run different
        functions (seen: log-probs off by up to 0.5) and the agreement check rightly stops the run.
        vLLM 0.32 has no bitsandbytes path, so the dequantized base is what it can run."""
        if not cfg.model.quantization.load_in_4bit:
            return paths.resolve(paths.policy_init)
        base = os.path.join(paths.scratch, "generator_base")
        self.policy.export_hf(base, merge_lora=True)  # adapter B = 0 at start: merged == base
        return base

    # -- the controller's calls ----------------------------------------------------------------
    def policy_version(self) -> int:
        return ray.get(self.policy.actors[0].version.remote())

    def generate(self, prompts: list, n: int, step: int):
        """Sample n per prompt. Step s is seeded from (run seed, s), so a resumed run samples exactly what
        the uninterrupted run would have."""
        return self.submit(prompts, n, step).result()

    def submit(self, prompts: list, n: int, step: int):
        """Start sampling step `step`'s rollouts; `.result()` waits for them."""
        seed = (self.cfg.run.seed * 1_000_003 + step * 7919) % (2 ** 30)
        return self.generator.submit(prompts, n, call_seed=seed)

    def score(self, prompts: list[str], responses: list[str], seq: SequenceBatch):
        """Reward, reference log-probs and values at once; the cores are split between them."""
        busy = 2 + (self.critic is not None)
        share = max(1, self.cores // busy)
        reward = self.reward.score.remote(prompts, responses, threads=share)
        if self.reference is not None:
            ref = [self.reference.ref_logprobs.remote(seq, threads=share)]
        else:
            ref = self._fan(self.policy, "ref_logprobs", seq, share)
        values = self._fan(self.critic, "values", seq, share) if self.critic else []
        (scores, stats), reward_s = ray.get(reward)
        ref_parts, value_parts = ray.get(ref), ray.get(values)
        ref_logp = torch.cat([t for t, _ in ref_parts])
        values_t = torch.cat([t for t, _ in value_parts]) if value_parts else None
        # the phase's critical path: the slowest of the roles that ran side by side
        stats["time/score_compute_s"] = max([reward_s] + [s for _, s in ref_parts + value_parts])
        return scores, ref_logp, values_t, stats

    @staticmethod
    def _fan(group: LearnerGroup, method: str, seq: SequenceBatch, threads: int) -> list:
        shards = split_rows(seq, group.num_ranks)
        return [getattr(a, method).remote(s, threads=threads) for a, s in zip(group.actors, shards)]

    def update(self, batch, minibatches, kl_coef: float, overlapped: bool = False) -> dict[str, float]:
        """Policy and critic updates side by side. When the next rollout is being generated meanwhile
        (`overlapped`), the generator's threads are taken out of the learners' share of the cores."""
        free = self.cores - (self.generator_threads if overlapped else 0)
        share = max(1, free // (1 + (self.critic is not None)))
        pol = [a.update.remote(batch, minibatches, kl_coef, threads=share) for a in self.policy.actors]
        crit = [a.update.remote(batch, minibatches, threads=share) for a in self.critic.actors] if self.critic else []
        pol_stats = ray.get(pol)
        stats = merge_update_stats(pol_stats)
        compute = max(s["time/compute_s"] for s in pol_stats)
        if crit:
            crit_stats = ray.get(crit)
            stats.update(merge_update_stats(crit_stats))
            compute = max([compute] + [s["time/compute_s"] for s in crit_stats])
        stats["time/update_compute_s"] = compute
        stats.pop("time/compute_s", None)
        return stats

    def sync_weights(self) -> tuple[int, dict[str, float]]:
        """Push the policy's weights to every engine; returns the new version and the sync's timings."""
        version = self.policy_version()
        if version == self.generator.version:
            return version, {}
        t = self.generator.sync_weights(self.policy.actors, self.mode, version)
        return version, {"sync/total_s": t["total_s"], "sync/pack_s": t["pack_s"], "sync/load_s": t["load_s"],
                         "sync/engine_s": t.get("engine_s", 0.0), "sync/buckets": float(t["buckets"])}

    # -- checkpoints ---------------------------------------------------------------------------
    def save(self, path: str, extra_state: dict) -> None:
        self.policy.save_checkpoint(os.path.join(path, "policy"), extra_state)
        if self.critic:
            self.critic.save_checkpoint(os.path.join(path, "critic"), {})

    def load(self, path: str) -> dict:
        extra = self.policy.load_checkpoint(os.path.join(path, "policy"))
        if self.critic:
            self.critic.load_checkpoint(os.path.join(path, "critic"))
        return extra

    def export(self, path: str, merge_lora: bool) -> None:
        self.policy.export_hf(path, merge_lora=merge_lora)

    def shutdown(self) -> None:
        self.generator.shutdown()
        for group in (self.policy, self.critic):
            if group is not None:
                group.shutdown()
        for actor in (self.reference, self.reward):
            if actor is not None:
                ray.kill(actor)
