"""Driver-side handle on `num_engines` generator actors: spread prompts, sync weights, heal restarts.

Dataflow of one step, as the RL roles (`rlhf_ray.rl.distributed`) drive it:
    rollout = group.submit(prompts).result()          # spread over engines, merged back in order
    ... learner update ...
    group.sync_weights(learner, version=step + 1)     # every engine at the new version
Each sync streams bucket by bucket from where the weights are (learner rank 0, or the driver for an
iterator) to every engine, and leaves a copy on the producer's disk as the restore point
(`rlhf_ray.sync.restore`): an engine that died is restarted by Ray (`max_restarts`) with the weights at
`model_path`, noticed by its version, and re-synced from that point before it serves again. Neither
the sync nor the restore point holds a model in Ray's object store (at most two buckets in flight).

Transport: "object_store" when every engine shares the driver's node (a bounded stream through the store,
zero-copy maps, `rlhf_ray.sync.stream`); "collective" otherwise (a gloo/NCCL broadcast to every engine,
see sync/collective.py, sent by the learner's rank 0 when the weights come from a learner: the driver may
sit on a CPU-only head node). A re-sync always goes through the store, from the restore point's disk.
A tensor-parallel engine's workers take a full sync off a broadcast themselves (`generator.worker_ext`):
in the collective group as one rank each, or relayed by their engine actor from the store's stream.
"""
from __future__ import annotations

import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Optional, Sequence

from rlhf_ray.generator.actor import GeneratorActor
from rlhf_ray.generator.engine import Prompt, engine_llm_kwargs, lora_rank_slot, quantization_for, workers_receive
from rlhf_ray.generator.records import Rollout, concat_rollouts
from rlhf_ray.generator.threads import engine_env
from rlhf_ray.sync.collective import CollectiveGroup
from rlhf_ray.sync.stream import ChannelSink, open_channel
from rlhf_ray.sync.transport import (COLLECTIVE, close_sender, learner_adapter_config, open_sender, remove_restore,
                                     replay_restore, sender_address, stream_from_learner, stream_weights)
from rlhf_ray.utils.net import node_address
from rlhf_ray.utils.device import Backend, resolve_backend

MODE_OF = {"auto": lambda lora: "adapter" if lora else "full", "full": lambda lora: "full",
           "adapter": lambda lora: "adapter"}


def split_evenly(items: Sequence, k: int) -> list[list]:
    """k contiguous chunks whose sizes differ by at most one (the first ones are the larger)."""
    if k <= 0:
        raise ValueError(f"k must be > 0, got {k}")
    q, r = divmod(len(items), k)
    out, start = [], 0
    for i in range(k):
        end = start + q + (1 if i < r else 0)
        out.append(list(items[start:end]))
        start = end
    return out


def tied_names(model_path: str) -> frozenset:
    """State-dict names the engine does not load: a tied `lm_head.weight` is the embedding again."""
    import json
    from pathlib import Path

    config = Path(model_path) / "config.json"
    tied = config.exists() and json.loads(config.read_text()).get("tie_word_embeddings", False)
    return frozenset({"lm_head.weight"}) if tied else frozenset()


def _learner_ranks(source) -> list:
    """The learner's actor handles if `source` is one or a list of them; [] for a `(name, tensor)` iterable."""
    if hasattr(source, "__ray_call__"):
        return [source]
    if isinstance(source, (list, tuple)) and source and all(hasattr(s, "__ray_call__") for s in source):
        return list(source)
    return []


def _actor_id(handle) -> Optional[str]:
    return None if handle is None else handle._actor_id.hex()


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
                 engine_kwargs: Optional[dict[str, Any]] = None, transport: str = "auto", max_restarts: int = 3,
                 collective_timeout_s: float = 120.0, options: Optional[list[dict]] = None,
                 restore_dir: Optional[str] = None):
        """options: Ray actor options per engine (`rlhf_ray.placement.groups.actor_options`: CPUs, GPUs,
        placement-group bundle); without them each engine asks for `rollout.cpus_per_engine` and
        `rollout.gpus_per_engine` (the engine's total, all its tensor-parallel workers).
        restore_dir: the folder of the restore point on the producer's node (disk, not /dev/shm: it holds
        a model); default a fresh folder under the system's temporary directory."""
        import ray

        if transport not in ("auto", "object_store", "collective"):
            raise ValueError(f"transport must be auto, object_store or collective, got {transport!r}")
        self.cfg, self.backend, self.lora = rollout_cfg, backend, lora
        self.version = 0
        self._restore: dict[str, Any] = {}          # mode -> (holder: learner rank 0 or None, folder, adapter cfg, version)
        self._restore_root = restore_dir or str(Path(tempfile.gettempdir()) / f"rlhf_ray_restore_{uuid.uuid4().hex[:12]}")
        self._holders: dict[Optional[str], Any] = {}   # who wrote restore points here: their folders go at shutdown
        self._channel = None                       # the object-store stream's queues (`rlhf_ray.sync.stream`)
        self._collective: Optional[tuple] = None   # (sender learner or None for the driver, driver's group, ranks)
        self._timeout = collective_timeout_s
        self._skip_full = tied_names(model_path)
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
        nodes = ray.get([a.node_id.remote() for a in self.actors])
        kwargs = engine_llm_kwargs(model_path, rollout_cfg, backend, lora, max_model_len, **opts)
        # ranks per engine in a full sync's broadcast: one per TP worker where the workers receive themselves
        self._sync_ranks = [kwargs["tensor_parallel_size"] if workers_receive(kwargs) else 1] * n
        here = ray.get_runtime_context().get_node_id()
        self.transport = transport if transport != "auto" else (
            "object_store" if all(n == here for n in nodes) else "collective")

    @classmethod
    def from_config(cls, cfg, model_path: Optional[str] = None, max_model_len: Optional[int] = None,
                    lora: Optional[bool] = None, backend: Optional[Backend] = None,
                    quantization: Optional[str] = None, **kwargs) -> "GeneratorGroup":
        """Build from the full `Config`: rollout section, model path/dtype/LoRA. `backend` and
        `quantization`: the engines' (from the plan in RL runs; else resolved on this node). `lora`:
        whether the engines take adapters (default: whenever the policy trains one)."""
        from rlhf_ray.models.kit import resolve_model_path

        if backend is None:
            backend = resolve_backend(cfg.cluster.device, cfg.model.dtype)
            quantization = quantization_for(backend, cfg.model.quantization.load_in_4bit)
        lora = cfg.model.lora.enabled if lora is None else lora
        rollout = cfg.rollout
        if cfg.cluster.simulate:  # a tensor-parallel engine's bundle keeps its logical GPUs; one CPU process computes
            rollout = rollout.model_copy(update={"tensor_parallel_size": 1})
        return cls(model_path or resolve_model_path(cfg.model.path), rollout, backend, lora,
                   max_model_len or cfg.data.max_prompt_len + cfg.rollout.max_new_tokens,
                   max_lora_rank=lora_rank_slot(cfg.model.lora.r) if lora else 16,
                   quantization=quantization, **kwargs)

    # -- generation -----------------------------------------------------------------------------
    def submit(self, prompts: Sequence[Prompt], n: Optional[int] = None, threads: int = 0, cores=None,
               **overrides) -> PendingRollout:
        """Start sampling n per prompt across the engines and return at once; `.result()` waits and merges
        in prompt order. Returning early lets the controller overlap the next step's generation with this
        step's update. An engine that Ray restarted is re-synced first; one that dies mid-call raises
        `RayActorError` from `.result()`, and the caller decides whether to sample again.
        threads / cores: the engines' share of their node's cores (`rlhf_ray.utils.phases`).
        overrides: the engine's `generate` keywords (temperature, top_p, max_new_tokens, stop, seeds,
        call_seed); `seeds` are split with the prompts, `call_seed` is offset per engine."""
        self.ensure_synced()
        n = n or self.cfg.n_samples_per_prompt
        chunks = split_evenly(list(range(len(prompts))), len(self.actors))
        busy = [(i, c) for i, c in enumerate(chunks) if c]
        parts = []
        for i, c in busy:
            sub = {k: ([v[j] for j in c] if k == "seeds" else v) for k, v in overrides.items()}
            if sub.get("call_seed") is not None:
                sub["call_seed"] = sub["call_seed"] + i  # engines draw different streams
            parts.append(self.actors[i].generate.remote([prompts[j] for j in c], n, sub, threads, cores))
        return PendingRollout(parts, [c[0] for _, c in busy])

    # -- weight sync ----------------------------------------------------------------------------
    def sync_weights(self, source, mode: Optional[str] = None, version: Optional[int] = None,
                     adapter_config: Optional[dict] = None) -> dict[str, float]:
        """Push the learner's weights to every engine and bump the version.

        source: an iterable of `(name, tensor)` (HF names for "full", peft names for "adapter"), or a
        learner actor handle (or the list of a learner's rank handles) whose `named_weights(mode)` /
        `adapter_config()` run inside the learner. mode: "full" | "adapter"; default from
        `rollout.sync.mode`. Returns timing stats.
        """
        import ray

        mode = mode or MODE_OF[self.cfg.sync.mode](self.lora)
        version = self.version + 1 if version is None else version
        if version <= self.version:
            raise ValueError(f"sync version {version} must exceed the current version {self.version}")
        if mode == "adapter" and not self.lora:
            raise ValueError("adapter sync on a group built with lora=False")
        t0 = time.perf_counter()
        bucket_bytes = int(self.cfg.sync.bucket_mb * 2 ** 20)
        skip = self._skip_full if mode == "full" else frozenset()
        ranks = _learner_ranks(source)
        holder = ranks[0] if ranks else None
        if mode == "adapter" and adapter_config is None and holder is not None:
            adapter_config = ray.get(holder.__ray_call__.remote(learner_adapter_config))
        if mode == "adapter" and adapter_config is None:
            raise ValueError("adapter sync needs adapter_config (the peft LoraConfig as a dict)")
        folder = str(Path(self._restore_root) / mode)
        meta = {"mode": mode, "version": version}
        if self.transport == "collective":
            self._ensure_collective(holder, mode)
            sink, done = COLLECTIVE, [a.receive.remote(mode, version, adapter_config) for a in self.actors]
        else:
            sink = ChannelSink.open(self._open_channel(), len(self.actors), self._timeout)
            done = [self._load_call(a, mode, [sink.reader(i)], adapter_config, version)
                    for i, a in enumerate(self.actors)]
        try:
            if ranks:
                outs = ray.get([r.__ray_call__.remote(stream_from_learner, mode, bucket_bytes, self.backend.dtype,
                                                      k == 0, skip, sink, folder, meta) for k, r in enumerate(ranks)])
                sent = outs[0]
            else:
                group = self._collective[1] if sink == COLLECTIVE else None
                sent = stream_weights(source, bucket_bytes, self.backend.dtype, skip, sink, folder, meta, group)
            t_pack = time.perf_counter()
            engine_s = ray.get(done)
        except Exception:
            if sink == COLLECTIVE:
                self._drop_collective()
            raise
        finally:
            if sink != COLLECTIVE:
                sink.close()
        self._holders[_actor_id(holder)] = holder
        self._restore[mode] = (holder, folder, adapter_config, version)
        self.version = version
        t_end = time.perf_counter()
        # pack_s: until the producer sent its last bucket (packing, the restore point's write and the transfer
        # overlap: the engines load while it packs); load_s: the rest, until every engine serves the new
        # version; engine_s: the slowest engine's own receive + vLLM reload.
        return {"version": version, "buckets": sent["buckets"], "bytes": sent["bytes"], "pack_s": t_pack - t0,
                "load_s": t_end - t_pack, "engine_s": max(engine_s), "total_s": t_end - t0}

    @staticmethod
    def _load_call(actor, mode, refs, adapter_config, version):
        if mode == "full":
            return actor.load_full.remote(refs, version)
        return actor.load_adapter.remote(refs, adapter_config, version)

    def _open_channel(self):
        if self._channel is None:
            self._channel = open_channel()
        return self._channel

    def _ensure_collective(self, sender=None, mode: str = "full") -> None:
        """Join every engine and the sender into one broadcast group (kept across syncs). Rank 0 is `sender`
        (learner rank 0: its node has the device the backend needs and the weights) when the weights come
        from a learner; the driver only for an iterator source (tests, tools). For a full sync a
        tensor-parallel engine takes one rank per TP worker (each reloads its shard off the stream:
        `rlhf_ray.generator.worker_ext`): 1 + sum(tp) ranks. An adapter sync goes to the engine actors."""
        import ray

        ranks = tuple(self._sync_ranks) if mode == "full" else (1,) * len(self.actors)
        if self._collective is not None and (_actor_id(self._collective[0]) != _actor_id(sender)
                                             or self._collective[2] != ranks):
            self._drop_collective()
        if self._collective is not None:
            return
        world, backend, device = 1 + sum(ranks), self.backend.dist_backend, self.backend.device
        if sender is None:
            host, port = node_address()
        else:
            host, port = ray.get(sender.__ray_call__.remote(sender_address))
        firsts = [1 + sum(ranks[:i]) for i in range(len(ranks))]
        joins = [(a.join_workers if k > 1 else a.join_group).remote(host, port, first, world, backend, device,
                                                                    self._timeout)
                 for a, first, k in zip(self.actors, firsts, ranks)]
        if sender is None:
            group = CollectiveGroup(host, port, 0, world, backend, device, self._timeout)
        else:
            joins.append(sender.__ray_call__.remote(open_sender, host, port, world, backend, device, self._timeout))
            group = None
        self._collective = (sender, group, ranks)  # set first: a failed join is torn down like a failed send
        try:
            ray.get(joins)
        except Exception:
            self._drop_collective()
            raise

    def _drop_collective(self) -> None:
        import ray

        if self._collective is not None:
            sender, group, _ = self._collective
            self._collective = None
            if group is not None:
                group.close()
            else:
                ray.wait([sender.__ray_call__.remote(close_sender)], timeout=10)
            ray.wait([a.leave_group.remote() for a in self.actors], num_returns=len(self.actors), timeout=10)

    # -- restarts -------------------------------------------------------------------------------
    def ensure_synced(self, timeout_s: float = 300.0) -> list[int]:
        """Re-sync every engine whose version differs from the group's (a restarted one is at 0)."""
        import ray

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
            if v != self.version:
                self._resync(actor)
                healed.append(i)
        if healed and self._collective is not None:
            self._drop_collective()          # the restarted engine left the group; rebuild it next sync
        return healed

    def _resync(self, actor) -> None:
        """Replay the restore points to one engine through the object store, from the disk that holds them."""
        import ray

        bucket_bytes = int(self.cfg.sync.bucket_mb * 2 ** 20)
        for mode in ("full", "adapter"):     # a base push first, then the adapter on top of it
            if mode not in self._restore:
                continue
            holder, folder, adapter_config, version = self._restore[mode]
            sink = ChannelSink.open(self._open_channel(), 1, self._timeout)
            try:
                done = self._load_call(actor, mode, [sink.reader(0)], adapter_config, version)
                if holder is None:
                    replay_restore(None, folder, sink, bucket_bytes)
                else:
                    ray.get(holder.__ray_call__.remote(replay_restore, folder, sink, bucket_bytes))
                ray.get(done)
            finally:
                sink.close()
        if ray.get(actor.version.remote()) != self.version:
            raise RuntimeError(f"re-synced engine is at version {ray.get(actor.version.remote())}, "
                               f"expected {self.version}")

    def shutdown(self) -> None:
        import ray

        self._drop_collective()
        for a in self.actors:
            ray.kill(a, no_restart=True)
        self.actors = []
        self._restore = {}
        for holder in self._holders.values():   # the restore points on disk, wherever they were written
            if holder is None:
                remove_restore(None, self._restore_root)
            else:
                ray.wait([holder.__ray_call__.remote(remove_restore, self._restore_root)], timeout=10)
        self._holders = {}
        if self._channel is not None:
            ray.kill(self._channel)
            self._channel = None
