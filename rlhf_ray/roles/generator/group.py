"""Driver-side handle on `num_engines` generator actors: spread prompts, merge rollouts, heal restarts.

    rollout = group.submit(prompts).result()          # spread over engines, merged back in order

An engine that died is restarted by Ray (`max_restarts`) with the weights at `model_path`; `submit` notices
it by its version and has it healed before it serves again. Healing, like every weight push, is the
sync's (`rlhf_ray.sync.streamed`, which registers itself with `heal_with`): this group only generates.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional, Protocol, Sequence

from rlhf_ray.dispatch import split_evenly
from rlhf_ray.roles.generator.actor import GeneratorActor
from rlhf_ray.roles.generator.engine import PromptInput, engine_llm_kwargs, workers_receive
from rlhf_ray.records import Rollout, concat_rollouts
from rlhf_ray.roles.generator.threads import engine_env
from rlhf_ray.utils.device import Backend


def tied_names(model_path: str) -> frozenset:
    """State-dict names the engine does not load: a tied `lm_head.weight` is the embedding again."""
    config = Path(model_path) / "config.json"
    tied = config.exists() and json.loads(config.read_text()).get("tie_word_embeddings", False)
    return frozenset({"lm_head.weight"}) if tied else frozenset()


def per_prompt(key: str, value) -> bool:
    """Whether a `generate` keyword holds one value per prompt (split with the prompts over the engines)."""
    return key == "seeds" or (key == "max_new_tokens" and isinstance(value, (list, tuple)))


def limits(max_new_tokens) -> dict:
    """The `generate` keyword for per-prompt token limits, or none (the rollout section's limit)."""
    return {} if max_new_tokens is None else {"max_new_tokens": list(max_new_tokens)}


class Healer(Protocol):
    served_version: int   # what every engine should serve

    def heal(self, actor) -> None:
        """Bring a restarted engine to `served_version`."""


class PendingRollout:
    """Per-engine rollouts in flight; `result()` merges them in prompt order."""

    def __init__(self, refs: list, offsets: list[int]):
        self.refs, self.offsets = refs, offsets

    def result(self) -> Rollout:
        import ray
        return concat_rollouts(ray.get(self.refs), self.offsets)


class GeneratorGroup:
    def __init__(self, model_path: str, rollout_cfg, backend: Backend, lora: bool = False, max_model_len: int = 512,
                 *, max_lora_rank: int = 16, quantization: Optional[str] = None,
                 engine_kwargs: Optional[dict[str, Any]] = None, max_restarts: int = 3,
                 options: Optional[list[dict]] = None):
        """options: Ray actor options per engine (`rlhf_ray.placement.groups.actor_options`: CPUs, GPUs,
        placement-group bundle); without them each engine asks for `rollout.cpus_per_engine` and
        `rollout.gpus_per_engine` (the engine's total, all its tensor-parallel workers)."""
        import ray

        self.cfg, self.lora = rollout_cfg, lora
        self.skip_full = tied_names(model_path)   # names a full sync leaves out
        self._healer: Optional[Healer] = None
        opts = dict(max_lora_rank=max_lora_rank, quantization=quantization, engine_kwargs=engine_kwargs)
        n = rollout_cfg.num_engines
        if options is None:
            options = [dict(num_cpus=rollout_cfg.cpus_per_engine, num_gpus=rollout_cfg.gpus_per_engine)] * n
        if len(options) != n:
            raise ValueError(f"{len(options)} actor options for {n} engines (rollout.num_engines)")
        remote = ray.remote(GeneratorActor)
        self.actors = [remote.options(**options[i], max_restarts=max_restarts, max_task_retries=0,
                                      runtime_env={"env_vars": engine_env(rollout_cfg)}).remote(
            model_path, rollout_cfg, backend, lora, max_model_len, opts) for i in range(n)]
        self.nodes = ray.get([a.node_id.remote() for a in self.actors])
        kwargs = engine_llm_kwargs(model_path, rollout_cfg, backend, lora, max_model_len, **opts)
        # ranks per engine in a full sync's broadcast: one per TP worker where the workers receive themselves
        self.sync_ranks = [kwargs["tensor_parallel_size"] if workers_receive(kwargs) else 1] * n

    # -- generation -----------------------------------------------------------------------------
    def submit(self, prompts: Sequence[PromptInput], n: Optional[int] = None, threads: int = 0, cores=None,
               **overrides) -> PendingRollout:
        """Start sampling n per prompt across the engines and return at once; `.result()` waits and merges
        in prompt order. Returning early lets the controller overlap the next step's generation with this
        step's update. An engine that Ray restarted is healed first; one that dies mid-call raises
        `RayActorError` from `.result()`, and the caller decides whether to sample again.
        threads / cores: the engines' share of their node's cores (`rlhf_ray.utils.phases`).
        overrides: the engine's `generate` keywords (temperature, top_p, max_new_tokens, stop, seeds,
        call_seed); per-prompt lists (`seeds`, a list of `max_new_tokens`) are split with the prompts,
        `call_seed` is offset per engine."""
        self.ensure_synced()
        n = n or self.cfg.n_samples_per_prompt
        chunks = split_evenly(list(range(len(prompts))), len(self.actors))
        busy = [(i, c) for i, c in enumerate(chunks) if c]
        parts = []
        for i, c in busy:
            sub = {k: ([v[j] for j in c] if per_prompt(k, v) else v) for k, v in overrides.items()}
            if sub.get("call_seed") is not None:
                sub["call_seed"] = sub["call_seed"] + i  # engines draw different streams
            parts.append(self.actors[i].generate.remote([prompts[j] for j in c], n, sub, threads, cores))
        return PendingRollout(parts, [c[0] for _, c in busy])

    # -- restarts -------------------------------------------------------------------------------
    def heal_with(self, healer: Healer) -> None:
        """The weight sync that pushes to these engines, and so knows what they should serve."""
        self._healer = healer

    def ensure_synced(self, timeout_s: float = 300.0, pushed: Optional[int] = None, heal: bool = True) -> list[int]:
        """Heal every engine whose version differs from the sync's (a restarted one is at 0); their indices.
        `pushed`: a version some engines took in a push that failed on another; those are left as they are.
        heal=False: only wait until each answers (a push about to reach every engine re-syncs them itself)."""
        import ray

        if self._healer is None:   # no sync ever reached these engines: a restarted one serves what they do
            return []
        deadline, healed = time.monotonic() + timeout_s, []
        for i, actor in enumerate(self.actors):
            while True:
                try:
                    v = ray.get(actor.version.remote())
                    break
                except ray.exceptions.RayActorError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.5)          # restarting: Ray re-runs __init__
            if v not in (self._healer.served_version, pushed):
                if heal:
                    self._healer.heal(actor)
                healed.append(i)
        return healed

    def shutdown(self) -> None:
        import ray

        # a killed engine leaves what only its close removes: a TP engine's shared memory (its workers' queues
        # and all-reduce buffers), any engine's adapter scratch folder and vLLM's rendezvous file in /tmp
        try:
            ray.get([a.close.remote() for a in self.actors], timeout=60)
        except Exception:  # noqa: BLE001 - a dead or stuck engine: killed below all the same
            pass
        for a in self.actors:
            ray.kill(a, no_restart=True)
        self.actors = []
