"""A weight sync as one stream of buckets: packed where the weights are, sent as they are packed.

The producer is learner rank 0 (through Ray's `__ray_call__`: its own weights never detour via the
driver, which may sit on a CPU-only head node) or the driver for a `(name, tensor)` iterable. It packs
lazily (`pack_buckets(..., reuse=True)`: one bucket buffer), writes each bucket to the on-disk restore
point (`rlhf_ray.sync.restore`) where the sync keeps one there, and sends it before packing the next:
- "collective": a gloo / NCCL broadcast to every engine (`rlhf_ray.sync.collective`); nothing in the
  object store;
- "channel": through the object store, at most two buckets at a time (`rlhf_ray.sync.stream`).
A restarted engine is re-synced by replaying the restore point from the disk of whoever wrote it, or, where
the sync keeps none (lockstep runs: `EngineStream`), by streaming again from the learner.
"""
from __future__ import annotations

import shutil
from typing import Any, Iterable, Iterator, Optional

import torch

from rlhf_ray.learner.weights import without
from rlhf_ray.buckets import pack_buckets, unpack_bucket
from rlhf_ray.sync.restore import RestoreWriter, read_restore
from rlhf_ray.sync.stream import BucketStream, fetch

COLLECTIVE = "collective"   # the sink of a broadcast stream (the group itself is the producer's)


def iter_named(items: Iterable) -> Iterator[tuple[str, torch.Tensor]]:
    """`(name, tensor)` from what an engine's load call received: a `BucketStream`, or bucket refs."""
    for item in items:
        if isinstance(item, BucketStream):
            yield from item.named()
        else:
            yield from unpack_bucket(fetch(item))


def send(buckets, sink, group=None) -> dict[str, int]:
    if sink == COLLECTIVE:
        count = [0]

        def counted():
            for b in buckets:
                count[0] += 1
                yield b
        return {"bytes": group.send_buckets(counted()), "buckets": count[0]}
    return sink.send(buckets)


def stream_weights(named: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int, dtype: Optional[torch.dtype],
                   skip: frozenset, sink, restore_folder: Optional[str], meta: dict, group=None) -> dict[str, int]:
    """Pack, keep on disk (unless `restore_folder` is None) and send one sync; the restore point is swapped in
    only once all was sent."""
    buckets = pack_buckets(without(named, skip), bucket_bytes, dtype, reuse=True)
    if restore_folder is None:
        return send(buckets, sink, group)
    writer = RestoreWriter(restore_folder, meta)
    out = send(writer.tee(buckets), sink, group)
    writer.commit()
    return out


# -- run inside a learner rank (`learner.__ray_call__.remote(fn, ...)`: `learner` is the actor) ----------
# The broadcast groups this process sends on, by the name of the transport that opened them. Kept here, in the
# learner's process, rather than on the learner: the sync owns its groups, the learner only lends its weights.
_senders: dict[str, Any] = {}


def stream_from_learner(learner: Any, mode: str, bucket_bytes: int, dtype: Optional[torch.dtype], is_source: bool,
                        skip: frozenset, sink, restore_folder: Optional[str], meta: dict,
                        sender: str = "") -> Optional[dict]:
    """Every rank iterates (a ZeRO-3 learner gathers each parameter collectively); rank 0 streams, on the
    broadcast group `sender` opened in this process (`open_sender`) when the sink is the collective, and
    answers what it sent and the learner's optimizer steps at the time (`updates`: what a re-sync from the
    learner checks is unchanged)."""
    from rlhf_ray.learner.weights import drain
    named = learner.named_weights(mode, frozen=False)  # the engines start from the rest and keep it
    if not is_source:
        drain(named)
        return None
    out = stream_weights(named, bucket_bytes, dtype, skip, sink, restore_folder, meta, _senders.get(sender))
    return {**out, "updates": learner_updates(learner)}


def learner_updates(learner: Any) -> int:
    return learner.updates()


def replay_restore(holder: Any, folder: str, sink, bucket_bytes: int) -> dict[str, int]:
    """Send a restore point from this process's disk (`holder`: the learner actor, or None on the driver)."""
    return send(pack_buckets(read_restore(folder), bucket_bytes, reuse=True), sink)


def remove_restore(holder: Any, root: str) -> None:
    shutil.rmtree(root, ignore_errors=True)


def learner_adapter_config(learner: Any) -> dict:
    return learner.adapter_config()


def sender_address(learner: Any) -> tuple[str, int]:
    """The learner node's IP and a free port on it: where the engines meet the sender."""
    from rlhf_ray.utils.net import node_address
    return node_address()


def open_sender(learner: Any, sender: str, host: str, port: int, world_size: int, backend: str, device: str,
                timeout_s: float) -> None:
    from rlhf_ray.sync.collective import CollectiveGroup
    close_sender(learner, sender)
    _senders[sender] = CollectiveGroup(host, port, 0, world_size, backend, device, timeout_s)


def close_sender(learner: Any, sender: str) -> None:
    group = _senders.pop(sender, None)
    if group is not None:
        group.close()
