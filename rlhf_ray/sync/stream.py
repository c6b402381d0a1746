"""Buckets streamed from one producer to N consumers through Ray's object store, a bounded number at a time.

Why not put a whole sync in the store and hand out the refs: that holds the model there (141 GB for a
70B policy, twice with the previous sync kept as a restore point, against Ray's object-store cap: it
spills every step). Here a `BucketChannel` actor keeps a short queue of refs per consumer. The producer
waits until every consumer's queue has room, puts ONE bucket (`ray.put`: one copy, mapped by every
consumer of a node) and hands its ref to every queue; a consumer drops a bucket before it takes the
next. So a stream holds at most `depth + 1` buckets in the store (default 2): the one the slowest
consumer reads and the one queued for it. A consumer's release reaches the owner (the producer)
asynchronously (seen: 10 buckets of 1 MiB still held when only the queue was waited on), so the producer
also waits until its own reference table says that no more than `depth` of its buckets are held anywhere.
Nothing waits forever: every wait carries the sync's timeout.
"""
from __future__ import annotations

import asyncio
import collections
import time
import uuid
import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch

from rlhf_ray.buckets import Bucket, unpack_bucket

DEPTH = 1   # buckets queued per consumer beyond the one it reads


class BucketChannel:
    """Wrapped with `ray.remote` (`open_channel`). Async methods: a consumer waiting for its next bucket
    does not block the producer's calls, nor another consumer's."""

    def __init__(self, depth: int = DEPTH):
        self._depth = depth
        self._streams: dict[str, tuple[list[collections.deque], asyncio.Condition]] = {}

    async def open(self, stream_id: str, consumers: int) -> None:
        self._streams[stream_id] = ([collections.deque() for _ in range(consumers)], asyncio.Condition())

    async def room(self, stream_id: str) -> None:
        """Return once every consumer's queue holds fewer than `depth` buckets."""
        queues, changed = self._streams[stream_id]
        async with changed:
            await changed.wait_for(lambda: all(sum(x is not None for x in q) < self._depth for q in queues))

    async def put(self, stream_id: str, item) -> None:
        """Append `item` ([ref], or None: the end) to every queue (after `room`: within the bound)."""
        queues, changed = self._streams[stream_id]
        async with changed:
            for q in queues:
                q.append(item)
            changed.notify_all()

    async def get(self, stream_id: str, consumer: int):
        queues, changed = self._streams[stream_id]
        async with changed:
            await changed.wait_for(lambda: bool(queues[consumer]))
            item = queues[consumer].popleft()
            changed.notify_all()
            return item

    async def close(self, stream_id: str) -> None:
        self._streams.pop(stream_id, None)   # refs still queued (a failed stream) are dropped with it


def open_channel():
    import ray
    return ray.remote(BucketChannel).options(num_cpus=0).remote()


def fetch(ref) -> Bucket:
    """A bucket whose buffer maps the object store's shared memory (no copy, do not write to it)."""
    import ray
    array, specs = ray.get(ref)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "non-writable array": we only read it
        return Bucket(torch.from_numpy(array), specs)


@dataclass(frozen=True)
class ChannelSink:
    """Where a producer sends a stream: consumers 0..consumers-1 of `channel` read `stream_id`."""
    channel: Any
    stream_id: str
    consumers: int
    timeout_s: float

    @classmethod
    def open(cls, channel, consumers: int, timeout_s: float) -> "ChannelSink":
        import ray
        sink = cls(channel, uuid.uuid4().hex, consumers, timeout_s)
        ray.get(channel.open.remote(sink.stream_id, consumers), timeout=timeout_s)
        return sink

    def reader(self, consumer: int) -> "BucketStream":
        return BucketStream(self.channel, self.stream_id, consumer, self.timeout_s)

    def send(self, buckets: Iterable[Bucket]) -> dict[str, int]:
        """Producer: each bucket into the store once room is free, then the end marker."""
        import ray
        sent = count = 0
        held: collections.deque = collections.deque()   # ids of this stream's buckets someone may still hold
        for bucket in buckets:
            ray.get(self.channel.room.remote(self.stream_id), timeout=self.timeout_s)
            _wait_released(held, DEPTH, self.timeout_s)
            ref = ray.put((bucket.buffer.cpu().numpy(), bucket.specs))
            held.append(ref.hex().encode())
            ray.get(self.channel.put.remote(self.stream_id, [ref]), timeout=self.timeout_s)
            del ref                        # the queues and consumers hold it now; the store frees it after them
            sent, count = sent + bucket.nbytes, count + 1
        ray.get(self.channel.put.remote(self.stream_id, None), timeout=self.timeout_s)
        return {"bytes": sent, "buckets": count}

    def close(self) -> None:
        import ray
        ray.wait([self.channel.close.remote(self.stream_id)], timeout=10)


def _wait_released(held: collections.deque, keep: int, timeout_s: float) -> None:
    """Wait until at most `keep` of the objects `held` (ids this process owns) are referenced anywhere: the
    owner's table keeps an entry while any borrower (the channel, a consumer) still holds the object."""
    import ray
    core = ray._private.worker.global_worker.core_worker
    counts = getattr(core, "get_all_reference_counts", None)
    if counts is None:  # a Ray without the table: the queue's bound alone
        return
    deadline, delay = time.monotonic() + timeout_s, 0.0005
    while True:
        live = counts()
        still = [h for h in held if h in live]
        held.clear()
        held.extend(still)
        if len(held) <= keep:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(held)} weight buckets still held by the engines after {timeout_s:g} s")
        time.sleep(delay)
        delay = min(2 * delay, 0.02)


@dataclass(frozen=True)
class BucketStream:
    """A consumer's end of a stream; travels to the engine inside its `load_full([stream], ...)` call."""
    channel: Any
    stream_id: str
    consumer: int
    timeout_s: float

    def named(self) -> Iterator[tuple[str, torch.Tensor]]:
        import ray
        while True:
            item = ray.get(self.channel.get.remote(self.stream_id, self.consumer), timeout=self.timeout_s)
            if item is None:
                return
            bucket = fetch(item[0])
            del item
            yield from unpack_bucket(bucket)
            del bucket                     # released before the next bucket is asked for
