"""The streamed transports: weights packed into buckets and sent to generator engine actors.

    object_store  every engine on the driver's node: a bounded stream through Ray's object store (zero-copy
                  maps, at most two buckets in the store: `rlhf_ray.sync.stream`)
    collective    otherwise: a gloo / NCCL broadcast (`rlhf_ray.sync.collective`), sent by the learner's
                  rank 0 when the weights come from a learner (the driver may sit on a CPU-only head node)

Each sync streams bucket by bucket from where the weights are (learner rank 0 through `__ray_call__`, or
the driver for a `(name, tensor)` iterable). An engine that Ray restarted is noticed by the generator group
(`GeneratorGroup.ensure_synced`) and healed here, through the store, from its restore point:
    disk     a copy of each sync on the producer's disk (`rlhf_ray.sync.restore`), written as it streams;
             what runs whose rollouts may lag the learner need (`rollout.sync.max_off_policy_lag >= 1`: the
             learner updates while the engines sample with the weights it pushed before)
    learner  no copy: the learner streams its weights again. In lockstep the engines sample only between a
             push and the learner's next update, so its weights are the served ones whenever a heal is
             asked for (checked: its optimizer steps are those of the push). The copy it spares is the
             whole model written to disk at every step: on a GPU learner a device-to-host copy and a file
             write per bucket, in the broadcast's path, several times the broadcast itself.
Neither a sync nor a restore point holds a model in the object store.
A tensor-parallel engine's workers take a full sync off a broadcast themselves (`roles.generator.worker_ext`):
in the collective group as one rank each, or relayed by their engine actor from the store's stream.
"""
from __future__ import annotations

import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from rlhf_ray.sync.collective import CollectiveGroup
from rlhf_ray.sync.stream import ChannelSink, open_channel
from rlhf_ray.sync.transport import (COLLECTIVE, close_sender, learner_adapter_config, learner_updates, open_sender,
                                     remove_restore, replay_restore, sender_address, stream_from_learner,
                                     stream_weights)
from rlhf_ray.sync.weight_sync import Streamed, SyncStats
from rlhf_ray.utils.net import node_address


def learner_ranks(source) -> list:
    """The learner's actor handles if `source` is one or a list of them; [] for a `(name, tensor)` iterable."""
    if hasattr(source, "__ray_call__"):
        return [source]
    if isinstance(source, (list, tuple)) and source and all(hasattr(s, "__ray_call__") for s in source):
        return list(source)
    return []


def _actor_id(handle) -> Optional[str]:
    return None if handle is None else handle._actor_id.hex()


def _load_call(actor, mode, refs, adapter_config, version):
    if mode == "full":
        return actor.load_full.remote(refs, version)
    return actor.load_adapter.remote(refs, adapter_config, version)


@dataclass(frozen=True)
class RestorePoint:
    """What a restarted engine is re-synced to, for one mode: the last push of that mode."""
    version: int
    adapter_config: Optional[dict]
    folder: Optional[str]     # the push's buckets on the holder's disk; None: the learner streams them again
    ranks: tuple = ()         # the learner's rank handles (every rank iterates a stream); (): the driver pushed
    updates: int = 0          # the learner's optimizer steps at the push: unchanged when it streams them again

    @property
    def holder(self) -> Any:
        """Who sent the push (and keeps its folder): learner rank 0, or None for the driver."""
        return self.ranks[0] if self.ranks else None


class EngineStream:
    """What both streamed transports share: sending one sync, its restore point, healing a restarted engine.

    engines: the `GeneratorGroup` (its actors, whether they take adapters, its broadcast ranks per engine);
    the stream registers itself as the group's healer. source, mode: what `push` sends (the policy's rank
    handles, "full" | "adapter"); `send` takes them per call (tools, tests). dtype: the engines' (the weights
    are cast on the way). restore: "disk" | "learner" (the module's doc; a `(name, tensor)` source has no
    learner to ask and is always kept on disk). restore_dir: the restore points' folder on the producer's
    node (disk, not /dev/shm: it holds a model); default a fresh folder under the system's temporary directory."""

    def __init__(self, engines, *, bucket_mb: float, dtype, timeout_s: float = 120.0, source: Any = None,
                 mode: str = "full", restore: str = "disk", restore_dir: Optional[str] = None):
        if restore not in ("disk", "learner"):
            raise ValueError(f"restore must be disk or learner, got {restore!r}")
        self.engines, self.dtype, self.timeout_s = engines, dtype, timeout_s
        self.source, self.mode, self.restore = source, mode, restore
        self.bucket_bytes = int(bucket_mb * 2 ** 20)
        self._restore: dict[str, RestorePoint] = {}   # by mode
        self._root = restore_dir or str(Path(tempfile.gettempdir()) / f"rlhf_ray_restore_{uuid.uuid4().hex[:12]}")
        self._holders: dict[Optional[str], Any] = {}   # who wrote restore points: their folders go at close
        self._channel = None                            # the object-store stream's queues
        engines.heal_with(self)

    @property
    def served_version(self) -> int:
        """The version of the last sync the engines took (0: none yet)."""
        return max((point.version for point in self._restore.values()), default=0)

    def push(self, version: int) -> SyncStats:
        return self.send(self.source, self.mode, version)

    def send(self, source, mode: str, version: int, adapter_config: Optional[dict] = None) -> SyncStats:
        """Push `source`'s weights to every engine as `version`: an iterable of `(name, tensor)` (HF names for
        "full", peft names for "adapter"), or a learner's rank handle(s) whose `named_weights(mode)` /
        `adapter_config()` run inside the learner (every rank iterates; rank 0 streams)."""
        import ray

        if version <= self.served_version:
            raise ValueError(f"sync version {version} must exceed the served version {self.served_version}")
        if mode == "adapter" and not self.engines.lora:
            raise ValueError("adapter sync to engines built with lora=False")
        t0 = time.perf_counter()
        # An engine killed in a call still running when the push came (a rollout sampled beside the update) is
        # waited for here: a load call queued behind the dead one would fail with it, and a stream would wait
        # for a reader that is gone. The caller of the dead call samples again. The push itself re-syncs it,
        # unless the engines hold a restore point of the other mode (a base under an adapter): healed first.
        heal_first = any(m != mode for m in self._restore)
        if self.engines.ensure_synced(heal=heal_first) and not heal_first:
            self._restarted()
        ranks = learner_ranks(source)
        holder = ranks[0] if ranks else None
        if mode == "adapter" and adapter_config is None and holder is not None:
            adapter_config = ray.get(holder.__ray_call__.remote(learner_adapter_config))
        if mode == "adapter" and adapter_config is None:
            raise ValueError("adapter sync needs adapter_config (the peft LoraConfig as a dict)")
        skip = self._skip(mode)
        on_disk = self.restore == "disk" or not ranks
        folder, meta = str(Path(self._root) / mode) if on_disk else None, {"mode": mode, "version": version}
        actors = self.engines.actors
        try:
            sent, t_pack, engine_s = self._stream(source, ranks, mode, version, adapter_config, skip, folder, meta,
                                                  actors)
        except ray.exceptions.RayActorError:
            # An engine that died after the check above, before or while it loaded (a SIGKILL landing between
            # the two): once Ray has restarted it, healed to the served weights, then this version pushed again
            # to the engines that do not hold it (the others took it before the failure).
            if not self.partial_push:
                raise
            self.engines.ensure_synced(pushed=version, heal=heal_first)
            versions = ray.get([a.version.remote() for a in actors])
            behind = [a for a, v in zip(actors, versions) if v != version]
            if not behind:   # every engine holds it: the failure was not a death this can mend
                raise
            sent, t_pack, engine_s = self._stream(source, ranks, mode, version, adapter_config, skip, folder, meta,
                                                  behind)
        if on_disk:
            self._holders[_actor_id(holder)] = holder
        self._restore[mode] = RestorePoint(version, adapter_config, folder, tuple(ranks), sent.get("updates", 0))
        t_end = time.perf_counter()
        return SyncStats(version, t_end - t0, max(engine_s),
                         Streamed(t_pack - t0, t_end - t_pack, sent["buckets"], sent["bytes"]))

    def _produce(self, source, ranks, mode, skip, sink, folder, meta, group=None, sender: str = "") -> dict:
        """Pack and send from where the weights are; returns {"bytes", "buckets"} sent."""
        import ray
        if ranks:
            outs = ray.get([r.__ray_call__.remote(stream_from_learner, mode, self.bucket_bytes, self.dtype, k == 0,
                                                  skip, sink, folder, meta, sender) for k, r in enumerate(ranks)])
            return outs[0]
        return stream_weights(source, self.bucket_bytes, self.dtype, skip, sink, folder, meta, group)

    partial_push = False   # whether `_stream` can push to some of the engines only

    def _stream(self, source, ranks, mode, version, adapter_config, skip, folder, meta, actors):
        raise NotImplementedError

    def _skip(self, mode: str) -> frozenset:
        """Names a sync of `mode` leaves out: for a full one, the weights the engines tie (a tied lm_head)."""
        return self.engines.skip_full if mode == "full" else frozenset()

    def _restarted(self) -> None:
        """Engines were restarted and are left to the coming push (nothing to do for the object store)."""

    def _open_channel(self):
        if self._channel is None:
            self._channel = open_channel()
        return self._channel

    # -- healing -------------------------------------------------------------------------------
    def heal(self, actor) -> None:
        """Replay the restore points to one engine through the object store, from the disk that holds them or
        from the learner: a base push first, then the adapter on top of it."""
        import ray

        for mode in ("full", "adapter"):
            point = self._restore.get(mode)
            if point is None:
                continue
            if point.folder is None:
                self._check_learner_holds(point)
            sink = ChannelSink.open(self._open_channel(), 1, self.timeout_s)
            try:
                done = _load_call(actor, mode, [sink.reader(0)], point.adapter_config, point.version)
                if point.folder is None:
                    ray.get([r.__ray_call__.remote(stream_from_learner, mode, self.bucket_bytes, self.dtype, k == 0,
                                                   self._skip(mode), sink, None, {})
                             for k, r in enumerate(point.ranks)])
                elif point.holder is None:
                    replay_restore(None, point.folder, sink, self.bucket_bytes)
                else:
                    ray.get(point.holder.__ray_call__.remote(replay_restore, point.folder, sink, self.bucket_bytes))
                ray.get(done)
            finally:
                sink.close()
        if (got := ray.get(actor.version.remote())) != self.served_version:
            raise RuntimeError(f"re-synced engine is at version {got}, expected {self.served_version}")

    @staticmethod
    def _check_learner_holds(point: RestorePoint) -> None:
        import ray
        now = ray.get(point.holder.__ray_call__.remote(learner_updates))
        if now != point.updates:
            raise RuntimeError(f"a restarted engine needs the weights of version {point.version}, which the learner "
                               f"no longer holds ({now - point.updates} optimizer steps since) and no restore point "
                               "keeps: only runs whose rollouts may lag the learner (rollout.sync.max_off_policy_lag "
                               ">= 1) keep one")

    def close(self) -> None:
        import ray

        self._restore = {}
        for holder in self._holders.values():   # the restore points on disk, wherever they were written
            if holder is None:
                remove_restore(None, self._root)
            else:
                ray.wait([holder.__ray_call__.remote(remove_restore, self._root)], timeout=10)
        self._holders = {}
        if self._channel is not None:
            ray.kill(self._channel)
            self._channel = None


class ObjectStore(EngineStream):
    """Every engine reads the one stream through the store (`BucketChannel`), each bucket mapped once."""

    partial_push = True

    def _stream(self, source, ranks, mode, version, adapter_config, skip, folder, meta, actors):
        import ray
        sink = ChannelSink.open(self._open_channel(), len(actors), self.timeout_s)
        try:
            done = [_load_call(a, mode, [sink.reader(i)], adapter_config, version) for i, a in enumerate(actors)]
            sent = self._produce(source, ranks, mode, skip, sink, folder, meta)
            t_pack = time.perf_counter()
            return sent, t_pack, ray.get(done)
        finally:
            sink.close()


class Collective(EngineStream):
    """One broadcast group of the sender and every engine (kept across syncs, rebuilt after a heal or when
    the sender changes). Rank 0 is the sender: learner rank 0 when the weights come from a learner (its node
    has the device the backend needs, and the weights), the driver only for an iterator source. For a full
    sync a tensor-parallel engine takes one rank per TP worker (each reloads its shard off the stream):
    1 + sum(tp) ranks. An adapter sync goes to the engine actors."""

    def __init__(self, engines, *, backend: str, device: str, **kwargs):
        super().__init__(engines, **kwargs)
        self.backend, self.device = backend, device   # the broadcast's (gloo / nccl) and where it lives
        self.name = uuid.uuid4().hex                   # the sender's group, in the learner's process
        self._group: Optional[tuple] = None            # (sender learner or None for the driver, driver's group, ranks)

    def _stream(self, source, ranks, mode, version, adapter_config, skip, folder, meta, actors):  # every engine
        import ray
        holder = ranks[0] if ranks else None
        self._join(holder, mode)
        done = [a.receive.remote(mode, version, adapter_config) for a in self.engines.actors]
        try:
            sent = self._produce(source, ranks, mode, skip, COLLECTIVE, folder, meta, self._group[1], self.name)
            t_pack = time.perf_counter()
            return sent, t_pack, ray.get(done)
        except Exception:
            self._leave()
            raise

    def _join(self, sender, mode: str) -> None:
        import ray

        ranks = tuple(self.engines.sync_ranks) if mode == "full" else (1,) * len(self.engines.actors)
        if self._group is not None and (_actor_id(self._group[0]) != _actor_id(sender) or self._group[2] != ranks):
            self._leave()
        if self._group is not None:
            return
        world = 1 + sum(ranks)
        host, port = node_address() if sender is None else ray.get(sender.__ray_call__.remote(sender_address))
        firsts = [1 + sum(ranks[:i]) for i in range(len(ranks))]
        joins = [(a.join_workers if k > 1 else a.join_group).remote(host, port, first, world, self.backend,
                                                                    self.device, self.timeout_s)
                 for a, first, k in zip(self.engines.actors, firsts, ranks)]
        if sender is None:
            group = CollectiveGroup(host, port, 0, world, self.backend, self.device, self.timeout_s)
        else:
            joins.append(sender.__ray_call__.remote(open_sender, self.name, host, port, world, self.backend,
                                                    self.device, self.timeout_s))
            group = None
        self._group = (sender, group, ranks)  # set first: a failed join is torn down like a failed send
        try:
            ray.get(joins)
        except Exception:
            self._leave()
            raise

    def _leave(self) -> None:
        import ray

        if self._group is not None:
            sender, group, _ = self._group
            self._group = None
            if group is not None:
                group.close()
            else:
                ray.wait([sender.__ray_call__.remote(close_sender, self.name)], timeout=10)
            actors = self.engines.actors
            ray.wait([a.leave_group.remote() for a in actors], num_returns=len(actors), timeout=10)

    def heal(self, actor) -> None:
        super().heal(actor)
        self._leave()   # the restarted engine left the group; it is rebuilt at the next sync

    def _restarted(self) -> None:
        self._leave()   # as after a heal: the group is rebuilt for this push

    def close(self) -> None:
        self._leave()
        super().close()


TRANSPORTS = {"object_store": ObjectStore, "collective": Collective}


def engine_transport(kind: str, engines, *, backend: str = "gloo", device: str = "cpu", **kwargs) -> EngineStream:
    """The streamed transport `kind` to `engines`; "auto": the object store when every engine shares the
    driver's node, else the collective. backend / device: the collective's (gloo on CPU, nccl on GPU)."""
    import ray

    if kind == "auto":
        here = ray.get_runtime_context().get_node_id()
        kind = "object_store" if all(n == here for n in engines.nodes) else "collective"
    if kind not in TRANSPORTS:
        raise ValueError(f"transport must be auto, object_store or collective, got {kind!r}")
    if kind == "collective":
        return Collective(engines, backend=backend, device=device, **kwargs)
    return ObjectStore(engines, **kwargs)
