"""Runs inside each vLLM worker of a tensor-parallel engine: takes a weight sync straight off a broadcast.

vLLM mixes this class into its worker class (`LLM(worker_extension_cls=...)`,
`vllm/v1/worker/worker_base.py` `init_worker`), and `LLM.collective_rpc("rlhf_...")` runs a method on
every worker by name (`vllm/v1/serial_utils.py` `run_method`). Only strings and numbers cross that call
(msgpack): the weights do not. Each worker instead joins a `CollectiveGroup` as one rank of its own and
feeds the received `(name, tensor)` stream to its `reload_weights(weights_iterator=...)`: vLLM's weight
loaders slice each tensor, so a worker keeps its shard and drops the rest bucket by bucket. Nothing is
written to a folder; each worker receives one copy of the model over the wire and holds at most the
bucket in flight (plus what vLLM buffers of a fused layer) beyond its shard.

Method names carry the `rlhf_` prefix: vLLM refuses an extension attribute that the worker class has.
"""
from __future__ import annotations

from typing import Iterable, Iterator, Optional

import torch

EXTENSION = "rlhf_ray.roles.generator.worker_ext.WeightReceiver"


def counted(named: Iterable[tuple[str, torch.Tensor]], tally: list) -> Iterator[tuple[str, torch.Tensor]]:
    """Pass `(name, tensor)` through, adding each tensor's bytes to `tally[0]`."""
    for name, tensor in named:
        tally[0] += tensor.numel() * tensor.element_size()
        yield name, tensor


class WeightReceiver:
    """Mixed into vLLM's worker class: `self` is the worker (`rank`, `device`, `reload_weights`)."""

    _rlhf_group = None

    def rlhf_join(self, host: str, port: int, first_rank: int, world_size: int, backend: str, device: str,
                  timeout_s: float) -> int:
        """Join the sync's broadcast group as rank `first_rank + self.rank` (this worker's rank in its engine).
        Returns that rank."""
        from rlhf_ray.sync.collective import CollectiveGroup

        self.rlhf_leave()
        if device != "cpu" and getattr(self, "device", None) is not None:
            device = str(self.device)   # the worker's own GPU: NCCL wants every rank's tensors on its device
        rank = first_rank + self.rank
        self._rlhf_group = CollectiveGroup(host, port, rank, world_size, backend, device, timeout_s)
        return rank

    def rlhf_receive(self) -> int:
        """Reload every base weight from the group's next stream (one `reload_weights` call per sync: vLLM
        finalizes a fused layer once all its parts arrived). Returns the bytes this worker received."""
        if self._rlhf_group is None:
            raise RuntimeError("rlhf_receive() before rlhf_join()")
        tally = [0]
        self.reload_weights(weights_iterator=counted(self._rlhf_group.recv_named(), tally))
        return tally[0]

    def rlhf_receive_once(self, host: str, port: int, first_rank: int, world_size: int, backend: str, device: str,
                          timeout_s: float) -> int:
        """Join, take one stream, leave: the engine relaying a sync that reached its own process."""
        self.rlhf_join(host, port, first_rank, world_size, backend, device, timeout_s)
        try:
            return self.rlhf_receive()
        finally:
            self.rlhf_leave()

    def rlhf_leave(self) -> None:
        group: Optional[object] = self._rlhf_group
        self._rlhf_group = None
        if group is not None:
            group.close()
