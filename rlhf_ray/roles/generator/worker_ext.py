"""Runs inside each vLLM worker: a tensor-parallel engine's workers take a weight sync straight off a
broadcast; an in-process engine's one worker takes full pushes in place (`rlhf_load_in_place`).

vLLM mixes this class into its worker class (`LLM(worker_extension_cls=...)`,
`vllm/v1/worker/worker_base.py` `init_worker`), and `LLM.collective_rpc("rlhf_...")` runs a method on
every worker by name (`vllm/v1/serial_utils.py` `run_method`). To a worker in a process of its own only
strings and numbers cross that call (msgpack): the weights do not. Each such worker instead joins a `CollectiveGroup` as one rank of its own and
feeds the received `(name, tensor)` stream to its `reload_weights(weights_iterator=...)`: vLLM's weight
loaders slice each tensor, so a worker keeps its shard and drops the rest bucket by bucket. Nothing is
written to a folder; each worker receives one copy of the model over the wire and holds at most the
bucket in flight (plus what vLLM buffers of a fused layer) beyond its shard. An in-process worker is handed
the sync's iterator itself. After every reload of vLLM's, a tied lm_head is packed again (`_rlhf_reload`).

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
    _rlhf_in_place = None   # the in-place loader once checked against vLLM's reload; False: it did not match

    def rlhf_load_in_place(self, weights: Iterable[tuple[str, torch.Tensor]]) -> bool:
        """A full push into an in-process engine (tensors cannot cross to a worker process): written straight
        into the layers (`in_place`) once the first push, through vLLM's reload, showed that it places every
        tensor as vLLM does. Returns whether this push went in place."""
        from rlhf_ray.roles.generator.in_place import InPlaceLoader

        if self._rlhf_in_place is None:
            named = list(weights)
            self._rlhf_reload(iter(named))
            self._rlhf_in_place = InPlaceLoader.matching(self.model_runner.get_model(), named) or False
            return False
        if self._rlhf_in_place is False:
            self._rlhf_reload(weights)
            return False
        handed: list = []   # what the loader could not place (with the rest of the push) went to vLLM's reload

        def rest(named):
            handed.append(True)
            self._rlhf_reload(named)

        self._rlhf_in_place.load(weights, rest)
        runner = self.model_runner   # what vLLM's reload_weights invalidates after loading
        runner.reset_lora_state()
        runner.reset_encoder_cache()
        runner.reset_mm_cache()
        return not handed

    def _rlhf_reload(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """vLLM's reload, then the kernels it leaves stale: a tied lm_head's (`in_place.tied_followers`)."""
        from rlhf_ray.roles.generator.in_place import pack_followers

        self.reload_weights(weights_iterator=weights)
        pack_followers(self.model_runner.get_model())

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
        self._rlhf_reload(counted(self._rlhf_group.recv_named(), tally))
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
