"""The non-finite guard of an optimizer step: a NaN or infinite loss or gradient norm is never applied.

`learner.on_nonfinite` chooses what happens to such a step: `stop` raises `NonFiniteError` naming the
step and what was non-finite; `skip` drops the step (gradients zeroed, weights and optimizer untouched)
and counts it in `<kind>/nonfinite_skipped`. Pure: the learner passes numbers, this decides.
"""
from __future__ import annotations

import math
from typing import Optional

from rlhf_ray.errors import RunError


class NonFiniteError(RunError, FloatingPointError):
    """A step's loss or gradient was NaN or infinite and `on_nonfinite=stop`; the step was not applied."""


def nonfinite(loss: Optional[float] = None, grad_norm: Optional[float] = None) -> Optional[str]:
    """What is non-finite, or None. Either value may be unknown (None)."""
    if loss is not None and not math.isfinite(loss):
        return f"loss is {loss}"
    if grad_norm is not None and not math.isfinite(grad_norm):
        return f"gradient norm is {grad_norm}"
    return None


def refuse(problem: str, policy: str, kind: str, update: int, micro_batch: int) -> None:
    """Raise under `stop`; return (the caller skips) under `skip`."""
    if policy == "stop":
        raise NonFiniteError(f"{kind} update {update} refused: {problem} (micro-batch {micro_batch}); the step was "
                             f"not applied. Lower the learning rate, check the rewards, or set "
                             f"learner.on_nonfinite=skip to drop such steps and count them")
