"""The hand-over of the policy's weights to the engines, and the one owner of the weight version.

`version` counts pushes of new weights: 0 is what the engines started from, and every push of weights
the learner has changed since the last one adds 1, however many optimizer steps (PPO epochs times
minibatches) changed them. A rollout carries the version it was sampled with (`Rollout.weight_version`),
and an RL step pushes at most once (after its update), so a lag between a rollout and the learner is
measured in RL steps: `rollout.sync.max_off_policy_lag=1` means "sampled by the previous step's weights".

How the weights travel is the transport's; `WeightSync` decides when a push is due and at which version.
"""
from __future__ import annotations

from typing import Callable, Optional, Protocol


class Transport(Protocol):
    def push(self, version: int) -> dict[str, float]:
        """Hand the learner's current weights to every engine; on return each serves `version`."""


class WeightSync:
    def __init__(self, transport: Transport, learner_updates: Callable[[], int]):
        """learner_updates: how many optimizer steps the policy learner has applied (its counter); a push is
        due when it changed since the last push."""
        self.transport, self._updates = transport, learner_updates
        self.version = 0
        self._pushed_at = 0   # the engines start from the weights of a learner that has applied no update

    def push(self) -> Optional[dict[str, float]]:
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
