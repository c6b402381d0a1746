"""The colocated transport: each rank hands its own learner's weights to the engine in its own process.

No packing, no object store: the learner's parameters (gathered one module at a time under ZeRO-3, LoRA
merged for a full sync) go straight into the engine's `reload_weights`. On N ranks each rank loads what it
gathered into its own engine; the gathers are collectives, so every rank iterates.
"""
from __future__ import annotations

import time

from rlhf_ray.learner.weights import without
from rlhf_ray.sync.weight_sync import SyncStats


def hand_over(learner, engine, mode: str, version: int, skip: frozenset) -> float:
    """Run inside a colocated rank: load the learner's weights into `engine` as `version` ("full": every base
    weight that training changes but the names in `skip`, e.g. a tied lm_head; "adapter": the LoRA adapter and
    its config). Returns the engine's seconds."""
    if mode == "full":
        return engine.load_full(without(learner.named_weights("full", frozen=False), skip), version)
    return engine.load_adapter(learner.named_weights("adapter"), learner.adapter_config(), version)


class InProcess:
    """The driver's end: `ranks` are the colocated rank actors; each one's `sync(mode, version)` runs
    `hand_over` after any generation called before it (the rank's engine thread)."""

    def __init__(self, ranks: list, mode: str):
        self.ranks, self.mode = ranks, mode

    def push(self, version: int) -> SyncStats:
        import ray
        t0 = time.perf_counter()
        engine_s = ray.get([r.sync.remote(self.mode, version) for r in self.ranks])
        return SyncStats(version, time.perf_counter() - t0, max(engine_s), None)

    def close(self) -> None:
        pass
