"""Colocated placement: every role of one device in one process.

One `ColocatedRank` per device (one per GPU; one per CPU node) holds the policy learner rank and, beside
it in the same process, the vLLM engine, the reward scorer, the reference (the policy with its adapter
off under LoRA, a frozen copy otherwise) and PPO's critic. The phases take the device in turn (generate,
score, update, hand over weights), so each phase has every core (or the whole GPU) to itself, and
nothing inside a step crosses a process boundary but the records the controller reads: the new weights
go from the learner's parameters straight into the engine's `reload_weights`, no packing, no object
store. On N devices the prompts and batches are sharded over the N ranks and DeepSpeed averages the
gradients; each rank hands its own weights to its own engine.

With rollouts allowed one version behind (`rollout.sync.max_off_policy_lag=1`) the next step's generation
runs in the rank's engine thread while its learner thread trains, on disjoint cores (`ENGINE` concurrency
group: generations and weight pushes run there in the order they were called, so a push never lands
during a generation and a generation started before the update samples the weights before it).

`ColocatedRoles` is the controller's handle; it answers the same calls as the distributed
`rlhf_ray.placement.distributed.DistributedRoles`, so the controller never knows which placement it runs under.
"""
from __future__ import annotations

import contextlib
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Optional

import ray
import torch

from rlhf_ray.batch import SequenceBatch
from rlhf_ray.dispatch import mean_stats, split_evenly, split_rows
from rlhf_ray.roles.generator.group import PendingRollout, limits, per_prompt, tied_names
from rlhf_ray.learner.group import LearnerGroup
from rlhf_ray.roles.policy import PolicyRank
from rlhf_ray.placement.construct import Construction, PhaseShares, ProcessArgs, Share
from rlhf_ray.placement.groups import actor_options
from rlhf_ray.placement.plan import Plan
from rlhf_ray.placement.shared import Paths, RoleSections, critic_init_path, generator_base
from rlhf_ray.records import UpdateResult
from rlhf_ray.sync.in_process import InProcess, hand_over
from rlhf_ray.sync.weight_sync import WeightSync
from rlhf_ray.utils.device import make_backend
from rlhf_ray.utils.phases import CoreTeam, set_phase_threads, set_thread_share

# Ray concurrency group of a rank's engine calls (generate, sync): one thread of its own, in call order;
# every other call (score, update, checkpoints) runs in the actor's default thread.
ENGINE = "engine"


class ColocatedRank(PolicyRank):
    """A policy learner rank that also hosts the engine, the scorers and the critic of its device."""

    REMOTE_ARGS = {"concurrency_groups": {ENGINE: 1}}

    def __init__(self, rank: int, world_size: int, num_threads: int, *, sections: RoleSections, shares: PhaseShares):
        super().__init__(rank, world_size, num_threads, algo_cfg=sections.algorithm, ref_cfg=sections.reference,
                         temperature=sections.rollout.temperature, norm_len=sections.rollout.max_new_tokens)
        self.sections, self.threads, self.shares = sections, num_threads, shares  # each phase's threads: the plan's
        self.engine = self.reward = self.reference = self.critic = None
        self._turns = threading.Lock()
        self._generating = threading.Event()  # the engine thread is sampling (async mode scores beside it)
        self._critic_thread: Optional[ThreadPoolExecutor] = None  # PPO's critic updating beside the policy
        self._score_team = CoreTeam(shares.score_rows)  # scoring alone: its rows over the cores
        # Every phase that has the device to itself runs on this one thread, whichever Ray thread called it
        # (Ray calls `generate` and `sync` on the ENGINE thread, the rest on its default one). OpenMP keeps a
        # team of worker threads per calling thread, and a pass on another team than the last phase's ran
        # 2-4x slower op by op: the tiny model's bf16 reference pass after a generation took 33-49 ms against
        # 20-23 for the same pass again (torch profiler, in the rank); on one thread, 21 ms. One thread, one team.
        self._device = ThreadPoolExecutor(1, thread_name_prefix="rank-device")

    def _on_its_thread(self, beside: bool, fn, *args):
        """`fn(*args)` for a phase: beside another on its caller's thread, alone on the rank's device thread."""
        return fn(*args) if beside else self._device.submit(fn, *args).result()

    @contextlib.contextmanager
    def _phase(self, share: Share, beside: bool):
        """Run a generation or an update with its `share` of the cores: alone (every core), or beside the other
        one (the overlap mode, on its own slice). Where the phases own the device (a GPU: the engine sleeps
        while the learner trains, and the memory plan counts them apart) the two never run at once, whichever
        thread they come on; a generation that waits for the update still samples the weights before it (the
        push comes after both)."""
        with self._turns if self.engine.can_sleep else contextlib.nullcontext():
            if beside:
                set_thread_share(share.threads, share.cores)
            else:
                set_phase_threads(share.threads)
            yield

    def setup_roles(self, generator_base: str, paths: Paths, total_updates: int, process: ProcessArgs) -> None:
        """Build the other roles once the learner (and its process group) exists, each from the plan's
        construction arguments of this process (`rlhf_ray.placement.construct`). The engine comes last: it
        finds the process group DeepSpeed made and reuses it."""
        from rlhf_ray.roles.generator.engine import GeneratorEngine
        from rlhf_ray.learner.learner import Learner
        from rlhf_ray.roles.critic import CriticWorker
        from rlhf_ray.roles.reference import ReferenceScorer
        from rlhf_ray.roles.reward import RewardScorer

        sec = self.sections
        critic = next((a for a in process.learners if a.role == "critic"), None)
        if critic is not None:
            learner = Learner(sec.model, sec.rl.critic, kind="value", init_path=critic_init_path(sec.rl, paths),
                              backend=critic.backend(), total_updates=total_updates, seed=sec.seed)
            self.critic = CriticWorker(learner, sec.algorithm, norm_len=sec.rollout.max_new_tokens)
        scorers = {s.role: s for s in process.scorers}
        rew = scorers["reward"]
        self.reward = RewardScorer(sec.reward, resolve_path=paths.resolve, device=rew.device,
                                   dtype=getattr(torch, rew.dtype), batch_size=rew.micro_batch)
        if "reference" in scorers:
            ref = scorers["reference"]
            self.reference = ReferenceScorer(paths.resolve(sec.reference.path or paths.policy_init),
                                             dtype=getattr(torch, ref.dtype), device=ref.device,
                                             temperature=sec.rollout.temperature, micro_batch_size=ref.micro_batch,
                                             max_tokens_per_micro_batch=sec.reference.max_tokens_per_micro_batch)
        e = process.engine
        self.engine = GeneratorEngine(generator_base, sec.rollout, make_backend(e.device, e.dtype), e.enable_lora,
                                      e.max_model_len, max_lora_rank=e.max_lora_rank or 16,
                                      quantization=e.quantization, engine_kwargs=e.llm_kwargs(generator_base))
        self._skip_full = tied_names(generator_base)
        set_phase_threads(self.threads)

    # -- the phases ----------------------------------------------------------------------------
    @ray.method(concurrency_group=ENGINE)
    def generate(self, prompts: list, n: int, overrides: dict, beside_update: bool = False):
        """Sample on this rank's engine, then hand the device back to the learner (on GPUs the engine
        sleeps until the weight push; after it the engine generates from the pushed weights only).
        beside_update: the learner trains at the same time; the engine keeps to its share of the cores."""
        return self._on_its_thread(beside_update, self._generate, prompts, n, overrides, beside_update)

    def _generate(self, prompts: list, n: int, overrides: dict, beside_update: bool):
        sh = self.shares
        with self._phase(sh.generate_beside_update if beside_update else sh.generate, beside_update):
            self._generating.set()
            try:
                return self.engine.generate(prompts, n, **overrides)
            finally:
                self._generating.clear()
                self.engine.release()

    def score(self, prompts: list[str], responses: list[str], finished: list[bool], seq: SequenceBatch):
        """(scores, reference log-probs, values or None, reward stats, compute seconds) of this shard."""
        if self._generating.is_set():  # async mode: a generation runs in the engine thread; keep to the learner's cores
            share = self.shares.update_beside_generate
            set_thread_share(share.threads, share.cores)
            return self._score(prompts, responses, finished, seq, None)
        return self._on_its_thread(False, self._score_alone, prompts, responses, finished, seq)

    def _score_alone(self, prompts: list[str], responses: list[str], finished: list[bool], seq: SequenceBatch):
        set_phase_threads(self.shares.score.threads)  # every core again, after an update beside a generation
        return self._score(prompts, responses, finished, seq, self._score_team)

    def _score(self, prompts: list[str], responses: list[str], finished: list[bool], seq: SequenceBatch,
               team: Optional[CoreTeam]):
        t0 = time.perf_counter()
        scores, stats = self.reward.score(prompts, responses, team, finished)
        ref = self.reference.logprobs(seq, team) if self.reference is not None else self.worker.ref_logprobs(seq, team)
        values = self.critic.values(seq, team) if self.critic is not None else None
        return scores, ref, values, stats, time.perf_counter() - t0

    def update(self, batch, minibatches, kl_coef: float, beside_generation: bool = False) -> UpdateResult:
        """PPO epochs of the policy (and the critic). beside_generation: the next step's rollouts are being
        sampled at the same time; the learner keeps to its share of the cores."""
        return self._on_its_thread(beside_generation, self._update, batch, minibatches, kl_coef, beside_generation)

    def _update(self, batch, minibatches, kl_coef: float, beside_generation: bool) -> UpdateResult:
        sh = self.shares
        if self.critic is not None and sh.policy_and_critic is not None and not beside_generation:
            return self._update_both_at_once(batch, minibatches, kl_coef, *sh.policy_and_critic)
        with self._phase(sh.update_beside_generate if beside_generation else sh.update, beside_generation):
            result = self.worker.update(batch, minibatches, kl_coef, self.rank, self.world_size)
            if self.critic is not None:
                critic = self.critic.update(batch, minibatches, self.rank, self.world_size)
                result = result.with_critic(critic, beside=False)
        return result

    def _update_both_at_once(self, batch, minibatches, kl_coef: float, policy: Share, critic: Share) -> UpdateResult:
        """The policy's update on this thread and the critic's on the rank's second thread, each pinned to its
        share of the cores (the plan's `PhaseShares.policy_and_critic`). An error in either is raised once both
        have stopped."""
        def critic_update():
            set_thread_share(critic.threads, critic.cores)
            return self.critic.update(batch, minibatches, self.rank, self.world_size)
        if self._critic_thread is None:  # one thread for the run: its OpenMP team is made once
            self._critic_thread = ThreadPoolExecutor(1, thread_name_prefix="critic-update")
        with self._phase(self.shares.update, beside=False):
            done = self._critic_thread.submit(critic_update)
            try:
                set_thread_share(policy.threads, policy.cores)
                result = self.worker.update(batch, minibatches, kl_coef, self.rank, self.world_size)
            except BaseException:
                wait([done])
                raise
            return result.with_critic(done.result(), beside=True)

    @ray.method(concurrency_group=ENGINE)
    def sync(self, mode: str, version: int) -> float:
        """The in-process transport's rank side (`rlhf_ray.sync.in_process`): this rank's weights into its
        engine, after any generation called before it. Returns the engine's seconds."""
        return self._on_its_thread(False, self._sync, mode, version)

    def _sync(self, mode: str, version: int) -> float:
        set_phase_threads(self.threads)
        return hand_over(self.learner, self.engine, mode, version, self._skip_full)

    @ray.method(concurrency_group=ENGINE)
    def close_engine(self) -> None:
        """What a killed rank would leave: the engine's scratch folder (vLLM's rendezvous and sockets, pushed
        adapters). Last, at the run's end: vLLM's cleanup takes the process group the learner made too."""
        if self.engine is not None:
            self._on_its_thread(False, self.engine.close)
            self.engine = None

    # -- checkpoints: the critic lives here too --------------------------------------------------
    def save_roles(self, path: str) -> None:
        self.learner.save_checkpoint(os.path.join(path, "policy"), {})
        if self.critic is not None:
            self.critic.learner.save_checkpoint(os.path.join(path, "critic"), {})

    def load_roles(self, path: str) -> None:
        self.learner.load_checkpoint(os.path.join(path, "policy"))
        if self.critic is not None:
            self.critic.learner.load_checkpoint(os.path.join(path, "critic"))


class ColocatedRoles:
    """The controller's handle on N colocated ranks (see the module docstring)."""

    def __init__(self, sections: RoleSections, args: Construction, paths: Paths, plan: Plan, groups: dict,
                 total_updates: int):
        """Rank i asks Ray for exactly the plan's colocated bundle i (it holds every role of the rank) and is
        built from the construction arguments of its process (`args`, `rlhf_ray.placement.construct`)."""
        self.args = args
        policy = args.process("policy", 0).learners[0]
        self.sections, self.backend = sections, policy.backend()
        p = sections.rl.policy
        self.policy = LearnerGroup(sections.model, p, kind="policy", init_path=paths.policy_init,
                                   total_updates=total_updates, backend=self.backend, seed=sections.seed,
                                   num_threads=policy.threads,
                                   options=[actor_options(plan, groups, "policy", r) for r in range(p.num_ranks)],
                                   rank_cls=ColocatedRank, rank_kwargs=dict(sections=sections, shares=args.shares))
        self.ranks = self.policy.actors
        base = generator_base(sections.model, paths, self.policy)
        ray.get([r.setup_roles.remote(base, paths, total_updates, args.process("policy", i))
                 for i, r in enumerate(self.ranks)])
        self.weights = WeightSync(InProcess(self.ranks, args.sync.mode),
                                  lambda: ray.get(self.ranks[0].updates.remote()))

    def generate(self, prompts: list, n: int, seed: int, max_new_tokens: list[int] | None = None):
        """max_new_tokens: one limit per prompt (a multi-turn episode's budget left); None: the rollout's."""
        return self._fan_out(prompts, n, seed, limits(max_new_tokens)).result()

    def submit(self, prompts: list, n: int, seed: int, max_new_tokens: list[int] | None = None) -> PendingRollout:
        """Start the next step's rollouts, sharded over the ranks' engines, to run beside the coming update
        (each rank's engine thread; the weight push that follows the update waits for them)."""
        return self._fan_out(prompts, n, seed, limits(max_new_tokens), beside_update=True)

    def sample(self, prompts: list, n: int, temperature: float, seed: int, max_new_tokens: list[int] | None = None):
        """Sampling outside training (held-out evaluation): its own temperature (0: greedy) and seed."""
        return self._fan_out(prompts, n, seed, {"temperature": temperature, **limits(max_new_tokens)}).result()

    def _fan_out(self, prompts: list, n: int, seed: int, overrides: dict, beside_update: bool = False) -> PendingRollout:
        chunks = split_evenly(list(range(len(prompts))), len(self.ranks))
        refs = [r.generate.remote([prompts[j] for j in c], n,
                                  {**{k: [v[j] for j in c] if per_prompt(k, v) else v for k, v in overrides.items()},
                                   "call_seed": seed + i}, beside_update)
                for i, (r, c) in enumerate(zip(self.ranks, chunks)) if c]
        return PendingRollout(refs, [c[0] for c in chunks if c])

    def score(self, prompts: list[str], responses: list[str], finished: list[bool], seq: SequenceBatch):
        shards = split_rows(seq, len(self.ranks))
        k = len(seq) // len(self.ranks)
        rows = [slice(i * k, (i + 1) * k) for i in range(len(self.ranks))]
        parts = ray.get([r.score.remote(prompts[at], responses[at], finished[at], s)
                         for r, at, s in zip(self.ranks, rows, shards)])
        scores = [x for part in parts for x in part[0]]
        stats = mean_stats([p[3] for p in parts])
        ref_logp = torch.cat([p[1] for p in parts])
        values = torch.cat([p[2] for p in parts]) if parts[0][2] is not None else None
        stats["time/score_compute_s"] = max(p[4] for p in parts)
        return scores, ref_logp, values, stats

    def update(self, batch, minibatches, kl_coef: float, overlapped: bool = False) -> UpdateResult:
        return UpdateResult.merge(ray.get([r.update.remote(batch, minibatches, kl_coef, overlapped)
                                           for r in self.ranks]))

    def save(self, path: str) -> None:
        ray.get([r.save_roles.remote(path) for r in self.ranks])

    def load(self, path: str) -> None:
        # the engines keep serving their version until `weights.restore` pushes the restored weights
        ray.get([r.load_roles.remote(path) for r in self.ranks])

    def export(self, path: str, merge_lora: bool) -> None:
        self.policy.export_hf(path, merge_lora=merge_lora)

    def processes(self) -> list[tuple[str, object]]:
        """(name an operator knows it by, actor) for every process of the graph."""
        critic = ", critic" if self.sections.uses_critic else ""
        return [(f"colocated rank {i} (policy, generator, reward, reference{critic})", a) for i, a in enumerate(self.ranks)]

    def shutdown(self) -> None:
        self.weights.close()
        try:
            ray.get([r.close_engine.remote() for r in self.ranks], timeout=60)
        except Exception:  # noqa: BLE001 - a dead or stuck rank: killed below all the same
            pass
        self.policy.shutdown()
