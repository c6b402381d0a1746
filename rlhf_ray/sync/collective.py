"""A standalone broadcast group for weight sync across nodes: gloo on CPU, NCCL on GPU.

Why standalone: an in-process vLLM engine already owns torch's default process group (world size 1),
so `init_process_group` cannot be called again there. A backend object built on its own `TCPStore`
(what `init_process_group` builds internally) joins the sender (rank 0) and the engines (ranks 1..N)
without touching the default group, and is torn down by dropping it.

No hangs: the store and the group carry a timeout, so a rank that never arrives (crashed actor, wrong
address) fails every other rank with a timeout error instead of blocking forever.

Wire protocol per bucket, all broadcasts from rank 0: a header (2,) int64 [buffer bytes, spec bytes],
the specs as JSON bytes (`rlhf_ray.buckets.encode_specs`), then the buffer. A header of [0, 0] ends
the stream, so receivers need no advance knowledge of how many buckets or which tensors will come.
Nothing received is unpickled: a peer on the network could otherwise run code in every engine; the
JSON header is checked against the buffer it describes before any byte of it is read.
"""
from __future__ import annotations

from datetime import timedelta
from typing import Iterable, Iterator

import torch
import torch.distributed as dist

from rlhf_ray.buckets import MAX_HEADER_BYTES, Bucket, decode_specs, encode_specs, unpack_bucket

def _gloo(store, rank: int, size: int, timeout: timedelta):
    return dist.ProcessGroupGloo(store, rank, size, timeout)


def _nccl(store, rank: int, size: int, timeout: timedelta):
    # Without options ProcessGroupNCCL keeps NCCL's 10-minute default (STACK.md): a sync that stalls would
    # then wait 10 minutes and the watchdog kill the learner instead of failing in `timeout`. This is how
    # torch's own `init_process_group` hands its timeout to NCCL (`distributed_c10d._new_process_group_helper`).
    options = dist.ProcessGroupNCCL.Options()
    options._timeout = timeout
    return dist.ProcessGroupNCCL(store, rank, size, options)


_BACKENDS = {"gloo": _gloo, "nccl": _nccl}


class CollectiveGroup:
    def __init__(self, host: str, port: int, rank: int, world_size: int, backend: str = "gloo",
                 device: str = "cpu", timeout_s: float = 120.0):
        if backend not in _BACKENDS:
            raise ValueError(f"collective backend {backend!r} not supported; choose from {sorted(_BACKENDS)}")
        timeout = timedelta(seconds=timeout_s)
        self.rank, self.world_size, self.device = rank, world_size, torch.device(device)
        self._store = dist.TCPStore(host, port, world_size, is_master=rank == 0, timeout=timeout)
        self._pg = _BACKENDS[backend](dist.PrefixStore("rlhf_ray_sync", self._store), rank, world_size, timeout)

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        self._pg.broadcast([tensor], opts).wait()
        return tensor

    def send_buckets(self, buckets: Iterable[Bucket]) -> int:
        """Rank 0: broadcast every bucket, then the end marker. Returns bytes sent."""
        sent = 0
        for bucket in buckets:
            meta = torch.frombuffer(bytearray(encode_specs(bucket.specs)), dtype=torch.uint8).to(self.device)
            self.broadcast(torch.tensor([bucket.nbytes, meta.numel()], dtype=torch.int64, device=self.device))
            self.broadcast(meta)
            self.broadcast(bucket.buffer.to(self.device))
            sent += bucket.nbytes
        self.broadcast(torch.zeros(2, dtype=torch.int64, device=self.device))
        return sent

    def recv_named(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Ranks 1..N: `(name, tensor)` of each bucket as it arrives, until the end marker."""
        while True:
            header = self.broadcast(torch.zeros(2, dtype=torch.int64, device=self.device)).tolist()
            if header == [0, 0]:
                return
            if not (0 < header[1] <= MAX_HEADER_BYTES and header[0] >= 0):
                raise ValueError(f"bucket stream header {header} refused: not a [buffer bytes, spec bytes] pair")
            meta = self.broadcast(torch.empty(header[1], dtype=torch.uint8, device=self.device))
            specs = decode_specs(meta.cpu().numpy().tobytes(), header[0])
            buffer = self.broadcast(torch.empty(header[0], dtype=torch.uint8, device=self.device))
            yield from unpack_bucket(Bucket(buffer, specs))

    def close(self) -> None:
        shutdown = getattr(self._pg, "shutdown", None)
        if shutdown is not None:
            try:
                shutdown()
            except RuntimeError:
                pass
        self._pg = None
        self._store = None
