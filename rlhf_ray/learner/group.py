"""`LearnerGroup`: N learner ranks as Ray actors joined in one torch.distributed group.

Why our own actor group and not Ray Train's `TorchTrainer`: a trainer owns the loop (`fit()` runs a
function to completion), while the RL controller interleaves generation, scoring and updates and calls
the learner step by step. Actors keep the model resident between calls and the driver calls the roles'
ranks (`rlhf_ray.roles.policy.PolicyRank`, `...critic.CriticRank`) like local functions (the verl /
OpenRLHF pattern). The gloo / NCCL group is set up by hand (rank 0 publishes an address and a free
port), which is all TorchTrainer would add here.
Where ranks run is not decided here: the RL stage hands each rank the actor options of its bundle in
the cluster plan (`rlhf_ray.placement`); without them (tests) each rank asks for the learner config's
CPUs and GPUs.

Each actor is a thin shell around `Learner`; splitting and merging batches are the pure functions of
`rlhf_ray.dispatch`. The group itself only starts the ranks and fans out checkpoints and exports.
"""
from __future__ import annotations

import os
from typing import Literal, Optional

import ray
import torch

from rlhf_ray.config.schema import LearnerConfig, ModelConfig
from rlhf_ray.utils.device import Backend


class LearnerRank:
    """One rank: a `Learner` behind a Ray actor (the group applies `ray.remote`). A role with passes of its
    own (the RL policy and critic) subclasses it, names its plain class in `WORKER` and adds the thin calls
    that delegate to `self.worker`; the group code stays the same."""

    WORKER: Optional[type] = None   # the role's plain class, built over this rank's learner: WORKER(learner, **kw)

    def __init__(self, rank: int, world_size: int, num_threads: int, **worker_kwargs):
        self.rank, self.world_size = rank, world_size
        from rlhf_ray.utils.device import set_threads
        set_threads(num_threads)
        self.learner = None
        self._worker_kwargs, self._worker = worker_kwargs, None

    @property
    def worker(self):
        if self._worker is None:  # the learner exists only after `setup`
            self._worker = self.WORKER(self.learner, **self._worker_kwargs)
        return self._worker

    def address(self) -> tuple[str, int]:
        from rlhf_ray.utils.net import node_address
        return node_address()

    def setup(self, addr: str, port: int, model_cfg, learner_cfg, kind, init_path, backend, total_updates, seed):
        from rlhf_ray.learner.learner import Learner
        os.environ.update(RANK=str(self.rank), WORLD_SIZE=str(self.world_size), LOCAL_RANK="0",
                          MASTER_ADDR=addr, MASTER_PORT=str(port))
        self.learner = Learner(model_cfg, learner_cfg, kind=kind, init_path=init_path, backend=backend,
                               total_updates=total_updates, seed=seed, num_threads=torch.get_num_threads())

    def updates(self) -> int:
        """Optimizer steps this rank's learner has applied (the weight sync pushes when it changed)."""
        return self.learner.updates

    # The weight-sync code calls these on the actor itself (`__ray_call__`), inside the learner process.
    def named_weights(self, mode: str, frozen: bool = True):
        return self.learner.named_weights(mode, frozen)

    def adapter_config(self) -> dict:
        return self.learner.adapter_config()

    def call(self, method: str, *args, **kwargs):
        return getattr(self.learner, method)(*args, **kwargs)


class LearnerGroup:
    """Driver-side handle; every method fans out to all ranks and returns merged results."""

    def __init__(self, model_cfg: ModelConfig, learner_cfg: LearnerConfig, *,
                 kind: Literal["policy", "reward", "value"], init_path: str, total_updates: int, backend: Backend,
                 seed: int = 0, num_threads: Optional[int] = None, options: Optional[list[dict]] = None,
                 rank_cls: type = LearnerRank, rank_kwargs: Optional[dict] = None):
        """backend: the ranks' device, dtype and dist backend (from the plan in RL runs). options: Ray actor
        options per rank (`rlhf_ray.placement.groups.actor_options`: CPUs, GPUs, placement-group bundle)."""
        n = learner_cfg.num_ranks
        # a rank class may declare class-level actor settings that `.options()` cannot take (concurrency groups)
        args = getattr(rank_cls, "REMOTE_ARGS", None)
        remote, extra = (ray.remote(**args)(rank_cls) if args else ray.remote(rank_cls)), rank_kwargs or {}
        self.num_ranks, self.cfg = n, learner_cfg
        threads = num_threads or max(1, int(learner_cfg.cpus_per_rank))
        if options is None:
            options = [dict(num_cpus=learner_cfg.cpus_per_rank, num_gpus=learner_cfg.gpus_per_rank)] * n
        if len(options) != n:
            raise ValueError(f"{len(options)} actor options for {n} learner ranks")
        self.actors = [remote.options(**options[r]).remote(r, n, threads, **extra) for r in range(n)]
        addr, port = ray.get(self.actors[0].address.remote())
        ray.get([a.setup.remote(addr, port, model_cfg, learner_cfg, kind, init_path, backend, total_updates, seed)
                 for a in self.actors])

    def _all(self, method: str, *args, **kwargs) -> list:
        return ray.get([getattr(a, method).remote(*args, **kwargs) for a in self.actors])

    def save_checkpoint(self, path: str, extra_state: dict) -> None:
        self._all("call", "save_checkpoint", path, extra_state)

    def load_checkpoint(self, path: str) -> dict:
        return self._all("call", "load_checkpoint", path)[0]

    def export_hf(self, path: str, merge_lora: bool = True) -> None:
        self._all("call", "export_hf", path, merge_lora)

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a)
        self.actors = []
