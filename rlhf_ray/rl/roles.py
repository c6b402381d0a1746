"""What the controller calls: the role graph of a run, whichever placement answers (`rlhf_ray.placement.graph`).

The controller (`rlhf_ray.rl.controller`) and the RL stage (`rlhf_ray.rl.run`, `rlhf_ray.rl.evaluation`,
`rlhf_ray.rl.checkpoint`) call these like local functions; the placements fan them out to the roles' processes
(`rlhf_ray.placement.colocated`, `rlhf_ray.placement.distributed`). Tests answer them with in-process fakes.
"""
from __future__ import annotations

import logging
from typing import Callable, Protocol

import torch

from rlhf_ray.batch import SequenceBatch
from rlhf_ray.records import Rollout
from rlhf_ray.records import TrainBatch, UpdateResult
from rlhf_ray.sync.weight_sync import WeightSync

log = logging.getLogger(__name__)


class Pending(Protocol):
    def result(self) -> Rollout: ...


class RoleGraph(Protocol):
    weights: WeightSync   # the hand-over to the engines; the weight version's owner

    def generate(self, prompt_ids: list, n: int, seed: int, max_new_tokens: list[int] | None = None) -> Rollout:
        """n samples per prompt drawn from `seed`, the engines alone; max_new_tokens: a limit per prompt (a
        multi-turn episode's budget left, `rlhf_ray.envs.episode`), None: rollout.max_new_tokens."""

    def submit(self, prompt_ids: list, n: int, seed: int, max_new_tokens: list[int] | None = None) -> Pending:
        """The same, started now to run beside the learner (the next step's rollouts, or async mode's)."""

    def sample(self, prompt_ids: list, n: int, temperature: float, seed: int,
               max_new_tokens: list[int] | None = None) -> Rollout:
        """Sampling outside training (held-out evaluation): its own temperature (0: greedy) and seed."""

    def score(self, prompts: list[str], responses: list[str], finished: list[bool], seq: SequenceBatch,
              ) -> tuple[list[float], torch.Tensor, torch.Tensor | None, dict[str, float]]:
        """(B,) rewards, (B, T) reference log-probs, (B, T) values or None, the scorers' statistics.
        finished: per row, False where the generator cut the response at its token limit."""

    def update(self, batch: TrainBatch, minibatches: list[list[torch.Tensor]], kl_coef: float,
               overlapped: bool = False) -> UpdateResult:
        """PPO epochs of the policy (and the critic), one optimizer step per minibatch."""

    def save(self, path: str) -> None:
        """Every role's state into the folder `path` (the controller's own goes beside it)."""

    def load(self, path: str) -> None: ...

    def export(self, path: str, merge_lora: bool) -> None: ...

    def processes(self) -> list[tuple[str, object]]:
        """(name an operator knows it by, actor) for every process of the graph."""

    def shutdown(self) -> None: ...


def sample_again_if_an_engine_died(call: Callable[[], Rollout], again: Callable[[], Rollout] | None = None
                                   ) -> Rollout:
    """`call()`, one generation on the engines, made once more if an engine process died in it: Ray restarts a
    generator engine (`GeneratorGroup`'s max_restarts), the next submission heals it to the served weights, and
    the same call (prompts, seed, limits) samples again, so no step is lost and none doubled. A second death in
    the same call, or a process Ray does not restart (a colocated rank: the learner died with it), raises.
    again: the second call where it is not `call` itself: a rollout submitted earlier (the lag-1 overlap's,
    sampled beside the update) is waited for by `call` and submitted anew, same prompts, seed and limits, by it."""
    try:
        return call()
    except Exception as e:  # noqa: BLE001 - only an engine's death is retried, anything else is raised as it is
        from ray.exceptions import RayActorError  # imported once a call failed: the controller's fakes run without Ray
        if not isinstance(e, RayActorError):
            raise
        log.warning(f"a generator engine died in a generation ({type(e).__name__}); Ray restarts it and the same "
                    f"prompts are sampled once more with the same seed")
    return (again or call)()
