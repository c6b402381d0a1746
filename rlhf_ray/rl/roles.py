"""The actor graph of an RL run, built from a Config, and the calls the controller makes on it.

    generator group (vLLM)   policy learner (+ reference under LoRA)   reward scorer
    reference scorer (full fine-tuning only)                            critic learner (PPO only)

Each call fans out with `.remote` and gathers once, so roles that can work at the same time do.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import ray

from rlhf_ray.config import Config
from rlhf_ray.rl.actors import CriticActor, PolicyActor, ReferenceActor, RewardActor
from rlhf_ray.utils.device import Backend


@dataclass(frozen=True)
class Paths:
    policy_init: str          # HF folder the policy (and reference) start from
    resolve: Callable[[str], str]  # resolves `stage:rm`, `builtin:...` and plain paths
    scratch: str              # run-local folder for files the roles hand each other


def sync_mode(cfg: Config) -> str:
    mode = cfg.rollout.sync.mode
    return ("adapter" if cfg.model.lora.enabled else "full") if mode == "auto" else mode


class Roles:
    def __init__(self, cfg: Config, paths: Paths, backend: Backend, total_steps: int):
        from rlhf_ray.generator.group import GeneratorGroup
        self.cfg, self.backend = cfg, backend
        self.cores = cfg.cluster.torch_threads or os.cpu_count() or 1
        self.mode = sync_mode(cfg)
        norm_len = cfg.rollout.max_new_tokens
        learner_res = dict(num_cpus=cfg.rl.policy.cpus_per_rank, num_gpus=cfg.rl.policy.gpus_per_rank)
        common = dict(backend=backend, total_steps=total_steps, seed=cfg.run.seed, num_threads=self.cores)
        self.policy = PolicyActor.options(**learner_res).remote(
            cfg.model, cfg.rl.policy, cfg.algorithm, cfg.reference, temperature=cfg.rollout.temperature,
            norm_len=norm_len, init_path=paths.policy_init, **common)
        self.critic = None
        if cfg.uses_critic:
            self.critic = CriticActor.options(num_cpus=cfg.rl.critic.cpus_per_rank,
                                              num_gpus=cfg.rl.critic.gpus_per_rank).remote(
                cfg.model, cfg.rl.critic, cfg.algorithm, norm_len=norm_len, init_path=paths.policy_init, **common)
        if cfg.model.lora.enabled and cfg.reference.path is None:
            self.reference = self.policy  # the base with the adapter switched off: no second copy
        else:
            ref_path = paths.resolve(cfg.reference.path or paths.policy_init)
            self.reference = ReferenceActor.options(num_cpus=0.5).remote(
                ref_path, dtype=backend.dtype, device=backend.device, temperature=cfg.rollout.temperature)
        self.reward = RewardActor.options(num_cpus=cfg.reward.num_cpus, num_gpus=cfg.reward.num_gpus).remote(
            cfg.reward, resolve_path=paths.resolve, device=backend.device)
        self.generator = GeneratorGroup.from_config(cfg, self._generator_base(cfg, paths))

    def _generator_base(self, cfg: Config, paths: Paths) -> str:
        """The weights the generator starts from. With a 4-bit (QLoRA) learner that is the learner's own
        dequantized NF4 base, not the original checkpoint: otherwise generator and learner run different
        functions (seen: log-probs off by up to 0.5) and the agreement check rightly stops the run.
        vLLM 0.32 has no bitsandbytes path, so the dequantized base is what it can run."""
        if not cfg.model.quantization.load_in_4bit:
            return paths.resolve(paths.policy_init)
        base = os.path.join(paths.scratch, "generator_base")
        ray.get(self.policy.export_hf.remote(base, True))  # adapter B = 0 at start: merged == base
        return base

    # -- the controller's calls ----------------------------------------------------------------
    def policy_version(self) -> int:
        return ray.get(self.policy.version.remote())

    def generate(self, prompts: list, n: int, step: int):
        """Sample n per prompt; prompt i of step s is seeded from (run seed, s, i), so a resumed run
        samples exactly what the uninterrupted run would have."""
        base = (self.cfg.run.seed * 1_000_003 + step * 7919) % (2 ** 30)
        return self.generator.generate(prompts, n, seeds=[base + i * n for i in range(len(prompts))])

    def score(self, prompts: list[str], responses: list[str], seq):
        """Reward, reference log-probs and values at once; the cores are split between them."""
        busy = 2 + (self.critic is not None)
        share = max(1, self.cores // busy)
        reward = self.reward.score.remote(prompts, responses, threads=share)
        ref = self.reference.ref_logprobs.remote(seq, threads=share)
        values = self.critic.values.remote(seq, threads=share) if self.critic else None
        (scores, stats), ref_logp = ray.get([reward, ref])
        return scores, ref_logp, (ray.get(values) if values is not None else None), stats

    def update(self, batch, minibatches, kl_coef: float) -> dict[str, float]:
        share = max(1, self.cores // (1 + (self.critic is not None)))
        pol = self.policy.update.remote(batch, minibatches, kl_coef, threads=share)
        crit = self.critic.update.remote(batch, minibatches, threads=share) if self.critic else None
        stats = ray.get(pol)
        if crit is not None:
            stats.update(ray.get(crit))
        return stats

    def sync_weights(self) -> tuple[int, dict[str, float]]:
        """Push the policy's weights to every engine; returns the new version and the sync's timings."""
        version = self.policy_version()
        if version == self.generator.version:
            return version, {}
        t = self.generator.sync_weights(self.policy, self.mode, version)
        return version, {"sync/total_s": t["total_s"], "sync/pack_s": t["pack_s"], "sync/load_s": t["load_s"],
                         "sync/buckets": float(t["buckets"])}

    # -- checkpoints ---------------------------------------------------------------------------
    def save(self, path: str, extra_state: dict) -> None:
        refs = [self.policy.save_checkpoint.remote(os.path.join(path, "policy"), extra_state)]
        if self.critic:
            refs.append(self.critic.save_checkpoint.remote(os.path.join(path, "critic"), {}))
        ray.get(refs)

    def load(self, path: str) -> dict:
        extra = ray.get(self.policy.load_checkpoint.remote(os.path.join(path, "policy")))
        if self.critic:
            ray.get(self.critic.load_checkpoint.remote(os.path.join(path, "critic")))
        return extra

    def export(self, path: str, merge_lora: bool) -> None:
        ray.get(self.policy.export_hf.remote(path, merge_lora))

    def shutdown(self) -> None:
        self.generator.shutdown()
        for actor in {id(a): a for a in (self.policy, self.critic, self.reference, self.reward) if a}.values():
            ray.kill(actor)

