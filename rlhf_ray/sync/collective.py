"""A standalone broadcast group for weight sync across nodes: gloo on CPU, NCCL on GPU.

Why standalone: an in-process vLLM engine already owns torch's default process group (world size 1),
so `init_process_group` cannot be called again there. A backend object built on its own `TCPStore`
(what `init_process_group` builds internally) joins the sender (rank 0) and the engines (ranks 1..N)
without touching the default group, and is torn down by dropping it.

No hangs: the store and the group carry a timeout, so a rank that never arrives (crashed actor, wrong
address) fails every other rank with a timeout error instead of blocking forever.

Wire protocol per bucket, all broadcasts from rank 0: a header (2,) int64 [buffer bytes, spec bytes],
the pickled specs as uint8, then the buffer. A header of [0, 0] ends the stream, so receivers need
no advance knowledge of how many buckets or which tensors will come.
"""
from __future__ import annotations

import pickle
from datetime import timedelta
from typing import Iterable, Iterator

import torch
import torch.distributed as dist

from rlhf_ray.sync.buckets import Bucket, unpack_bucket

_BACKENDS = {"gloo": lambda store, rank, size, timeout: dist.ProcessGroupGloo(store, rank, size, timeout),
             "nccl": lambda store, rank, size, timeout: dist.ProcessGroupNCCL(store, rank, size)}


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
            meta = torch.frombuffer(bytearray(pickle.dumps(bucket.specs)), dtype=torch.uint8).to(self.device)
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
            meta = self.broadcast(torch.empty(header[1], dtype=torch.uint8, device=self.device))
            specs = pickle.loads(meta.cpu().numpy().tobytes())
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
