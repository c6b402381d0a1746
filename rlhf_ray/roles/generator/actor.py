"""The Ray actor around `GeneratorEngine`: a thin shell that turns bucket refs into weight pushes."""
from __future__ import annotations

from typing import Optional

from rlhf_ray.roles.generator.engine import GeneratorEngine
from rlhf_ray.records import Rollout
from rlhf_ray.sync.collective import CollectiveGroup
from rlhf_ray.sync.transport import iter_named
from rlhf_ray.utils.phases import node_cores, set_phase_threads  # before vLLM patches torch's thread setter


class GeneratorActor:
    """Wrapped with `ray.remote` by `GeneratorGroup`; every method delegates to the engine."""

    def __init__(self, model_path: str, rollout_cfg, backend, lora: bool, max_model_len: int, engine_opts: dict):
        self.engine = GeneratorEngine(model_path, rollout_cfg, backend, lora, max_model_len, **engine_opts)
        self._group: Optional[CollectiveGroup] = None
        self._workers_joined = False   # the engine's TP workers, not this actor, are ranks of the sync group

    def node_id(self) -> str:
        import ray
        return ray.get_runtime_context().get_node_id()

    def version(self) -> int:
        return self.engine.version

    def close(self) -> None:
        self.engine.close()

    def generate(self, prompts, n, overrides: dict, threads: int = 0, cores=None) -> Rollout:
        """threads (0: every core of the node) on the slice `cores` of them (None: all)."""
        set_phase_threads(threads or node_cores(), cores)
        return self.engine.generate(prompts, n, **overrides)

    # -- object-store transport: refs arrive wrapped in a list, so Ray passes them unresolved ------
    def load_full(self, refs: list, version: int) -> float:
        return self.engine.load_full(iter_named(refs), version)

    def load_adapter(self, refs: list, adapter_config: dict, version: int) -> float:
        return self.engine.load_adapter(iter_named(refs), adapter_config, version)

    # -- collective transport -------------------------------------------------------------------
    def join_group(self, host: str, port: int, rank: int, world_size: int, backend: str, device: str,
                   timeout_s: float) -> None:
        self.leave_group()
        self._group = CollectiveGroup(host, port, rank, world_size, backend, device, timeout_s)

    def join_workers(self, host: str, port: int, first_rank: int, world_size: int, backend: str, device: str,
                     timeout_s: float) -> None:
        """Have the engine's TP workers join, as ranks first_rank .. first_rank + tp - 1 (full syncs only)."""
        self.leave_group()
        self.engine.join_group(host, port, first_rank, world_size, backend, device, timeout_s)
        self._workers_joined = True

    def receive(self, mode: str, version: int, adapter_config: Optional[dict]) -> float:
        if self._workers_joined:
            if mode != "full":
                raise RuntimeError(f"{mode} sync sent to a group the TP workers joined (full syncs only)")
            return self.engine.receive_full(version)
        if self._group is None:
            raise RuntimeError("receive() before join_group()")
        if mode == "full":
            return self.engine.load_full(self._group.recv_named(), version)
        return self.engine.load_adapter(self._group.recv_named(), adapter_config, version)

    def received(self) -> list[int]:
        """Bytes each TP worker took off the last full sync (empty where the workers do not receive)."""
        return list(self.engine.received)

    def leave_group(self) -> None:
        if self._group is not None:
            self._group.close()
            self._group = None
        if self._workers_joined:
            self._workers_joined = False
            self.engine.leave_group()
