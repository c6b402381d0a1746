"""The hand-over of the policy's weights to the engines, and the one owner of the weight version.

`version` counts pushes of new weights: 0 is what the engines started from, and every push of weights
the learner has changed since the last one adds 1, however many optimizer steps (PPO epochs times
minibatches) changed them. A rollout carries the version it was sampled with (`Rollout.weight_version`),
and an RL step pushes at most once (after its update), so a lag between a rollout and the learner is
measured in RL steps: `rollout.sync.max_off_policy_lag=1` means "sampled by the previous step's weights".

How the weights travel is the transport's (`construct.SyncArgs.transport` picks one per run):
    in_process    colocated: each rank hands its learner's weights to its own engine (`sync.in_process`)
    object_store  one node: a bounded stream of buckets through Ray's object store (`sync.streamed`)
    collective    across nodes or GPUs: a gloo / NCCL broadcast from learner rank 0 (`sync.streamed`)
`WeightSync` decides when a push is due and at which version; every transport answers with one `SyncStats`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Protocol


@dataclass(frozen=True)
class Streamed:
    """What a packed transport (object store, collective) adds: the stream itself."""
    pack_s: float     # until the producer sent its last bucket (packing, the restore point's write and the
                      # transfer overlap: the engines load while it packs)
    load_s: float     # the rest, until every engine serves the new version
    buckets: int
    bytes: int


@dataclass(frozen=True)
class SyncStats:
    """One push."""
    version: int
    total_s: float                 # the driver's wait, until every engine serves `version`
    engine_s: float                # the slowest engine's own receive and reload
    streamed: Optional[Streamed]   # None for the in-process hand-over: nothing is packed or sent

    def metrics(self) -> dict[str, float]:
        out = {"sync/total_s": self.total_s, "sync/engine_s": self.engine_s}
        if self.streamed is not None:
            s = self.streamed
            out.update({"sync/pack_s": s.pack_s, "sync/load_s": s.load_s, "sync/buckets": float(s.buckets),
                        "sync/bytes": float(s.bytes)})
        return out


class Transport(Protocol):
    def push(self, version: int) -> SyncStats:
        """Hand the learner's current weights to every engine; on return each serves `version`."""

    def close(self) -> None:
        """Release what the transport holds (groups, channels, restore points)."""


class WeightSync:
    def __init__(self, transport: Transport, learner_updates: Callable[[], int]):
        """learner_updates: how many optimizer steps the policy learner has applied (its counter); a push is
        due when it changed since the last push."""
        self.transport, self._updates = transport, learner_updates
        self.version = 0
        self._pushed_at = 0   # the engines start from the weights of a learner that has applied no update

    def push(self) -> Optional[SyncStats]:
        """Push the learner's weights if they changed since the last push (the version then grows by one);
        None when nothing changed (every optimizer step of the update was refused, learner.on_nonfinite)."""
        updates = self._updates()
        if updates == self._pushed_at:
            return None
        stats = self.transport.push(self.version + 1)
        self.version, self._pushed_at = self.version + 1, updates
        return stats

    def restore(self, version: int) -> None:
        """After a checkpoint load: the engines serve the restored weights as `version`, the count the run had
        reached when it saved (a resumed run reports the versions the uninterrupted one did). Version 0 is the
        starting weights, which the engines hold already."""
        if version > 0:
            self.transport.push(version)
        self.version, self._pushed_at = version, self._updates()

    def close(self) -> None:
        self.transport.close()
