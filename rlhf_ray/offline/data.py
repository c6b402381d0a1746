"""An offline stage's encoded data and its order.

Data order is a pure function of (seed, epoch): epoch e visits the training examples in the order of a
permutation seeded with `seed + e`, in batches of `batch_size` (a last partial batch is not used). So the
data position is just the optimizer step, and a resumed run sees exactly the batches it would have seen.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from rlhf_ray.config.schema import StageConfig


@dataclass
class StageData:
    train: list[dict]                         # encoded examples
    eval: list[dict]
    collate: Callable[[list[dict]], dict]     # examples -> batch of tensors
    info: dict                                # counts for the log (rows read, skipped, truncated, ...)


def epoch_order(n: int, epoch: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed + epoch)
    return torch.randperm(n, generator=g).tolist()


def batch_indices(n: int, step: int, steps_per_epoch: int, batch_size: int, seed: int) -> list[int]:
    """The training examples of optimizer step `step` (0-based)."""
    epoch, pos = divmod(step, steps_per_epoch)
    return epoch_order(n, epoch, seed)[pos * batch_size:(pos + 1) * batch_size]


def plan(name: str, stage: StageConfig, n_train: int) -> tuple[int, int]:
    """-> (steps per epoch, total optimizer steps)."""
    from rlhf_ray.config import ConfigError
    per_epoch = n_train // stage.batch_size
    if per_epoch == 0:
        raise ConfigError(f"{name}.batch_size={stage.batch_size} is larger than the {n_train} training examples")
    if stage.batch_size % stage.learner.num_ranks:
        raise ConfigError(f"{name}.batch_size={stage.batch_size} must be divisible by {name}.learner.num_ranks="
                          f"{stage.learner.num_ranks}")
    total = per_epoch * stage.epochs
    return per_epoch, min(total, stage.max_steps) if stage.max_steps else total
