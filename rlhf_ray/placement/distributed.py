"""Distributed placement: each role its own Ray actors, as on a cluster.

    generator group (vLLM engines)    policy learner group (N ranks; reference too under LoRA)
    reward scorer                      reference scorer (full fine-tuning only)
    critic learner group (PPO only)

Each call fans out with `.remote` and gathers once, so roles that can work at the same time do, each on
its share of the cores. Weights travel through the weight sync's streamed transport (`rlhf_ray.sync.streamed`:
object store on one node, a collective across nodes). Answers the same calls as `rlhf_ray.placement.colocated.ColocatedRoles`.
"""
from __future__ import annotations

import os

import ray
import torch

from rlhf_ray.batch import SequenceBatch
from rlhf_ray.dispatch import split_rows
from rlhf_ray.learner.group import LearnerGroup
from rlhf_ray.roles.critic import CriticRank
from rlhf_ray.roles.policy import PolicyRank
from rlhf_ray.placement.construct import Construction
from rlhf_ray.placement.groups import actor_options
from rlhf_ray.placement.plan import Plan
from rlhf_ray.records import UpdateResult
from rlhf_ray.rl.roles import sample_again_if_an_engine_died
from rlhf_ray.roles.generator.group import limits
from rlhf_ray.placement.shared import Paths, RoleSections, critic_init_path, generator_base
from rlhf_ray.utils.device import make_backend
from rlhf_ray.roles.reference import ReferenceActor
from rlhf_ray.roles.reward import RewardActor
from rlhf_ray.sync.streamed import engine_transport
from rlhf_ray.sync.weight_sync import WeightSync


class DistributedRoles:
    """The controller's handle on separate actors per role (see the module docstring)."""

    def __init__(self, sections: RoleSections, args: Construction, paths: Paths, plan: Plan, groups: dict,
                 total_updates: int):
        """Every actor asks Ray for exactly its bundle of `plan` (reserved as `groups`) and is built from the
        plan's construction arguments of its process (`args`, `rlhf_ray.placement.construct`) and its role's
        config section."""
        from rlhf_ray.roles.generator.group import GeneratorGroup
        sec, self.args = sections, args
        policy = args.learners("policy")[0]
        self.backend = policy.backend()
        norm_len = sec.rollout.max_new_tokens

        def ranks(role: str, n: int) -> list[dict]:
            return [actor_options(plan, groups, role, i) for i in range(n)]

        common = dict(init_path=paths.policy_init, total_updates=total_updates, seed=sec.seed)
        self.policy = LearnerGroup(sec.model, sec.rl.policy, kind="policy", rank_cls=PolicyRank, **common,
                                   backend=self.backend, num_threads=policy.threads,
                                   options=ranks("policy", sec.rl.policy.num_ranks),
                                   rank_kwargs=dict(algo_cfg=sec.algorithm, ref_cfg=sec.reference,
                                                    temperature=sec.rollout.temperature, norm_len=norm_len))
        self.critic = None
        if sec.uses_critic:
            critic = args.learners("critic")[0]
            self.critic = LearnerGroup(sec.model, sec.rl.critic, kind="value", rank_cls=CriticRank,
                                       **{**common, "init_path": critic_init_path(sec.rl, paths)},
                                       backend=critic.backend(), num_threads=critic.threads,
                                       options=ranks("critic", sec.rl.critic.num_ranks),
                                       rank_kwargs=dict(algo_cfg=sec.algorithm, norm_len=norm_len))
        self.reference = None  # under LoRA: the policy ranks with the adapter off, no second copy
        if (ref := args.scorer("reference")) is not None:
            ref_path = paths.resolve(sec.reference.path or paths.policy_init)
            self.reference = ReferenceActor.options(**actor_options(plan, groups, "reference")).remote(
                ref_path, dtype=getattr(torch, ref.dtype), device=ref.device, temperature=sec.rollout.temperature,
                micro_batch_size=ref.micro_batch,
                max_tokens_per_micro_batch=sec.reference.max_tokens_per_micro_batch)
        # a reward process that dies is restarted once and its call retried once
        rew = args.scorer("reward")
        self.reward = RewardActor.options(**actor_options(plan, groups, "reward"), max_restarts=1,
                                          max_task_retries=1).remote(
            sec.reward, resolve_path=paths.resolve, device=rew.device, dtype=getattr(torch, rew.dtype),
            batch_size=rew.micro_batch)
        engines = args.engines()
        e = engines[0]  # every engine of the group is built alike
        base = generator_base(sec.model, paths, self.policy)
        rollout = sec.rollout.model_copy(update={"tensor_parallel_size": e.tensor_parallel_size})
        engine_backend = make_backend(e.device, e.dtype)
        self.generator = GeneratorGroup(base, rollout, engine_backend, e.enable_lora, e.max_model_len,
                                        max_lora_rank=e.max_lora_rank or 16, quantization=e.quantization,
                                        engine_kwargs=e.llm_kwargs(base), options=ranks("generator", len(engines)))
        self.shares = args.shares  # each phase's threads and cores: the plan's
        s = args.sync
        transport = engine_transport(s.transport, self.generator, backend=s.backend, device=e.device,
                                     source=self.policy.actors, mode=s.mode, bucket_mb=s.bucket_mb,
                                     dtype=engine_backend.dtype, timeout_s=s.timeout_s, restore=s.restore)
        self.weights = WeightSync(transport, lambda: ray.get(self.policy.actors[0].updates.remote()))

    # -- the controller's calls ----------------------------------------------------------------
    def generate(self, prompts: list, n: int, seed: int, max_new_tokens: list[int] | None = None):
        """Sample n per prompt, the engines alone on their nodes (every core, or `rollout.threads`);
        max_new_tokens: one limit per prompt (a multi-turn episode's budget left), None: the rollout's."""
        # an engine that died mid-call is restarted, re-synced and asked again (`sample_again_if_an_engine_died`)
        return sample_again_if_an_engine_died(lambda: self.generator.submit(
            prompts, n, threads=self.shares.generate.threads, call_seed=seed, **limits(max_new_tokens)).result())

    def submit(self, prompts: list, n: int, seed: int, max_new_tokens: list[int] | None = None):
        """Start sampling the next step's rollouts to overlap the coming update: the engines keep the first
        `rollout.cpus_per_engine` cores of their node, the learners get the others (see `update`)."""
        g = self.shares.generate_beside_update
        return self.generator.submit(prompts, n, threads=g.threads, cores=g.cores, call_seed=seed,
                                     **limits(max_new_tokens))

    def sample(self, prompts: list, n: int, temperature: float, seed: int, max_new_tokens: list[int] | None = None):
        """Sampling outside training (held-out evaluation): its own temperature (0: greedy) and seed."""
        return self.generator.submit(prompts, n, temperature=temperature, call_seed=seed,
                                     **limits(max_new_tokens)).result()

    def score(self, prompts: list[str], responses: list[str], finished: list[bool], seq: SequenceBatch):
        """Reward, reference log-probs and values at once; the cores are split between them."""
        share = self.shares.score.threads
        reward = self.reward.score.remote(prompts, responses, threads=share, finished=finished)
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

    def update(self, batch, minibatches, kl_coef: float, overlapped: bool = False) -> UpdateResult:
        """Policy and critic updates side by side. When the next rollout is being generated meanwhile
        (`overlapped`), the generator's threads are taken out of the learners' share of the cores."""
        s = self.shares.update_beside_generate if overlapped else self.shares.update
        pol = [a.update.remote(batch, minibatches, kl_coef, threads=s.threads, cores=s.cores)
               for a in self.policy.actors]
        crit = ([a.update.remote(batch, minibatches, threads=s.threads, cores=s.cores) for a in self.critic.actors]
                if self.critic else [])
        result = UpdateResult.merge(ray.get(pol))
        if crit:
            result = result.with_critic(UpdateResult.merge(ray.get(crit)), beside=True)
        return result

    # -- checkpoints ---------------------------------------------------------------------------
    def save(self, path: str) -> None:
        self.policy.save_checkpoint(os.path.join(path, "policy"), {})
        if self.critic:
            self.critic.save_checkpoint(os.path.join(path, "critic"), {})

    def load(self, path: str) -> None:
        self.policy.load_checkpoint(os.path.join(path, "policy"))
        if self.critic:
            self.critic.load_checkpoint(os.path.join(path, "critic"))

    def export(self, path: str, merge_lora: bool) -> None:
        self.policy.export_hf(path, merge_lora=merge_lora)

    def processes(self) -> list[tuple[str, object]]:
        """(name an operator knows it by, actor) for every process of the graph."""
        out = [(f"policy learner rank {i}", a) for i, a in enumerate(self.policy.actors)]
        out += [(f"critic learner rank {i}", a) for i, a in enumerate(self.critic.actors if self.critic else [])]
        out += [(f"generator engine {i}", a) for i, a in enumerate(self.generator.actors)]
        return out + [(name, a) for name, a in (("reward", self.reward), ("reference", self.reference)) if a]

    def shutdown(self) -> None:
        self.weights.close()
        self.generator.shutdown()
        for group in (self.policy, self.critic):
            if group is not None:
                group.shutdown()
        for actor in (self.reference, self.reward):
            if actor is not None:
                ray.kill(actor)
