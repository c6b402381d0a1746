"""Moving buckets through Ray's object store: the in-node transport, and the restore point for engines.

`ray.put` of a bucket's byte buffer as a numpy array is one copy into shared memory; every engine on
the node then maps the same object without a copy (`ray.get` of a numpy array is zero-copy,
read-only). Across nodes Ray moves the object once per node. The refs also serve as the last synced
weights, from which a restarted engine is re-synced.

`publish_from_learner` runs inside a learner actor (through Ray's `__ray_call__`), so the learner
packs its own weights and only object refs travel back to the driver.
"""
from __future__ import annotations

import warnings
from typing import Any, Iterable, Iterator, Optional

import torch

from rlhf_ray.sync.buckets import Bucket, pack_buckets, unpack_bucket


def publish(buckets: Iterable[Bucket]) -> list:
    """Put each bucket in the object store; return the refs in order. Each bucket is copied before
    the next is drawn, so `pack_buckets(..., reuse=True)` is safe here."""
    import ray
    return [ray.put((b.buffer.cpu().numpy(), b.specs)) for b in buckets]


def fetch(ref) -> Bucket:
    """A bucket whose buffer maps the object store's shared memory (no copy, do not write to it)."""
    import ray
    array, specs = ray.get(ref)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "non-writable array": we only read it
        return Bucket(torch.from_numpy(array), specs)


def iter_named(refs: Iterable) -> Iterator[tuple[str, torch.Tensor]]:
    """`(name, tensor)` from bucket refs, fetching one bucket at a time."""
    for ref in refs:
        yield from unpack_bucket(fetch(ref))


def without(named: Iterable[tuple[str, torch.Tensor]], skip: frozenset) -> Iterator[tuple[str, torch.Tensor]]:
    return ((n, t) for n, t in named if n not in skip)


def publish_from_learner(learner: Any, mode: str, bucket_bytes: int, dtype: Optional[torch.dtype],
                         is_source: bool, skip: frozenset = frozenset()) -> tuple[list, Optional[dict]]:
    """Run inside a learner rank: pack `learner.named_weights(mode)` and publish it (rank 0 only).

    Every rank consumes the iterator, because a ZeRO-3 learner gathers each parameter collectively;
    the ranks that are not the source drop what they gather.
    """
    named = learner.named_weights(mode)
    if not is_source:
        for _ in named:
            pass
        return [], None
    refs = publish(pack_buckets(without(named, skip), bucket_bytes, dtype, reuse=True))
    return refs, (learner.adapter_config() if mode == "adapter" else None)


# -- the collective sender inside a learner rank (through `__ray_call__`) -----------------------------
# The broadcast's rank 0 is the learner's rank 0, not the driver: the driver may run on a CPU-only head
# node (no CUDA for NCCL), and the buckets are the learner's own objects, so they never detour via the head.
_SENDER = "_rlhf_ray_weight_sender"


def sender_address(learner: Any) -> tuple[str, int]:
    """The learner node's IP and a free port on it: where the engines meet the sender."""
    from rlhf_ray.utils.net import node_address
    return node_address()


def open_sender(learner: Any, host: str, port: int, world_size: int, backend: str, device: str,
                timeout_s: float) -> None:
    from rlhf_ray.sync.collective import CollectiveGroup
    close_sender(learner)
    setattr(learner, _SENDER, CollectiveGroup(host, port, 0, world_size, backend, device, timeout_s))


def send_refs(learner: Any, refs: list) -> int:
    """Broadcast the published buckets (refs inside a list: Ray passes them unresolved)."""
    group = getattr(learner, _SENDER, None)
    if group is None:
        raise RuntimeError("send_refs() before open_sender()")
    return group.send_buckets(fetch(r) for r in refs)


def close_sender(learner: Any) -> None:
    group = getattr(learner, _SENDER, None)
    if group is not None:
        group.close()
        setattr(learner, _SENDER, None)
