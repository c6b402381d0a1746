"""Per-token KL estimators and KL-coefficient controllers.

Estimators follow Schulman, "Approximating KL Divergence" (2020 blog post). With samples x ~ pi and
r = ref(x) / pi(x), each estimates KL(pi || ref):
    k1 = -log r              unbiased, high variance, can be negative per token
    k2 = (log r)^2 / 2       biased (low bias for nearby policies), always >= 0
    k3 = (r - 1) - log r     unbiased and low variance, always >= 0
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

# exp(20) ~ 5e8: beyond that the policies have nothing in common and k3 only needs to be large, not inf.
_MAX_LOG_RATIO = 20.0


def _k1(log_ratio: torch.Tensor) -> torch.Tensor:
    return log_ratio


def _k2(log_ratio: torch.Tensor) -> torch.Tensor:
    return 0.5 * log_ratio.square()


def _k3(log_ratio: torch.Tensor) -> torch.Tensor:
    # log_ratio = log pi - log ref, so log r = -log_ratio.
    log_r = (-log_ratio).clamp(max=_MAX_LOG_RATIO)
    return torch.expm1(log_r) - log_r


def _abs(log_ratio: torch.Tensor) -> torch.Tensor:
    return log_ratio.abs()


KL_ESTIMATORS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "k1": _k1,
    "k2": _k2,
    "k3": _k3,
    "abs": _abs,
}


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from log-probs of tokens sampled from pi.

    Source: Schulman 2020, "Approximating KL Divergence" (k1, k2, k3); "abs" is |k1| as in verl.
    Padded positions are not masked here; reduce with :mod:`rlhf_ray.algo.masked`.

    Args:
        logp: (B, T) log pi(x_t) of the sampled tokens.
        ref_logp: (B, T) log ref(x_t) of the same tokens.
        kind: one of ``KL_ESTIMATORS`` ("k1", "k2", "k3", "abs").

    Returns:
        (B, T) per-token estimate.
    """
    try:
        estimator = KL_ESTIMATORS[kind]
    except KeyError:
        raise ValueError(f"unknown KL estimator {kind!r}; allowed: {sorted(KL_ESTIMATORS)}") from None
    return estimator(logp - ref_logp)


class FixedKLController:
    """Constant KL coefficient (beta). ``update`` is a no-op so both controllers are interchangeable."""

    kind = "fixed"

    def __init__(self, coef: float):
        if not coef >= 0:
            raise ValueError(f"KL coefficient must be >= 0, got {coef}")
        self.value = float(coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict[str, float | str]:
        return {"kind": self.kind, "value": self.value}

    def load_state_dict(self, d: dict) -> None:
        """Check the kind only: a fixed coefficient is config, so on resume the config decides it (an
        operator may lower ``reference.kl_coef`` on ``--resume``)."""
        _check_kind(self.kind, d)


class AdaptiveKLController:
    """Proportional controller steering the measured KL towards ``target`` (Ziegler et al. 2019, sec. 2.2).

    e = clip(KL / target - 1, -0.2, 0.2);  beta <- beta * exp(e * n_steps / horizon).
    The clip bounds one update's change of beta. Units follow lm-human-preferences: KL is per sequence
    (summed over its tokens, "kl/seq_mean" of ``shape_rewards``; the paper's target is 6 nats) and
    ``n_steps`` counts samples, so pass the batch size and a horizon in samples (10000 there). The paper's
    factor (1 + e * n_steps / horizon) is this to first order; the exponential keeps beta positive when a
    short run wants a horizon of a few batches (the paper's factor is <= 0 from n_steps / horizon = 5).

    Two departures, both the usual anti-windup of an integrating controller, for runs of tens of steps:
    1. beta holds until the KL first reaches the target. A run starts at KL 0 and its KL climbs for many
       steps whatever beta is (measured on the quickstart: the same KL for 10 steps under betas 10x apart);
       Ziegler's rule cut beta by 20% on each of those steps (0.1 -> 0.011 in 10 steps) and then needed as
       many steps to raise it again while the KL overshot its target 2-4x. A KL that never reaches the
       target leaves beta where the config put it: ``reference.kl_coef`` is the most restraint you accept.
    2. after that, beta holds while the KL already moves towards the target (conditional integration);
       it moves while the KL stays on one side of the target or drifts away from it.
    """

    kind = "adaptive"

    def __init__(self, init_coef: float, target: float, horizon: float):
        if not init_coef > 0:
            raise ValueError(f"init_coef must be > 0 (a zero coefficient can never grow), got {init_coef}")
        if not target > 0:
            raise ValueError(f"target KL must be > 0, got {target}")
        if not horizon > 0:
            raise ValueError(f"horizon must be > 0, got {horizon}")
        self.value = float(init_coef)
        self.target = float(target)
        self.horizon = float(horizon)
        self.last_kl: float | None = None  # the previous measurement: which way the KL moves
        self.reached = False               # the KL has been at or above the target once

    def update(self, current_kl: float, n_steps: int) -> None:
        """Move ``value`` given the KL (python float, same unit as ``target``) of the last ``n_steps`` samples."""
        current_kl = float(current_kl)
        # A NaN/inf KL means the run is already broken; folding it into beta would hide where.
        if not math.isfinite(current_kl):
            raise ValueError(f"current_kl must be finite, got {current_kl}")
        if n_steps < 0:
            raise ValueError(f"n_steps must be >= 0, got {n_steps}")
        last, self.last_kl = self.last_kl, current_kl
        self.reached = self.reached or current_kl >= self.target
        if not self.reached:
            return  # still climbing from 0: lowering beta now only winds it down
        if last is not None and (current_kl - self.target) * (current_kl - last) < 0:
            return  # on its way to the target: integrating now only winds beta up (or down) past it
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= math.exp(error * n_steps / self.horizon)

    def state_dict(self) -> dict[str, float | str | None]:
        """``value``, the last KL and ``reached`` evolve; target and horizon are config, saved for inspection."""
        return {"kind": self.kind, "value": self.value, "last_kl": self.last_kl, "reached": self.reached,
                "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, d: dict) -> None:
        """Restore the evolving state. Target and horizon stay as constructed: the config decides them."""
        _check_kind(self.kind, d)
        self.value = float(d["value"])
        last = d.get("last_kl")  # absent in checkpoints written before the holds existed: Ziegler's rule
        self.last_kl = None if last is None else float(last)
        self.reached = bool(d.get("reached", True))


def _check_kind(expected: str, d: dict) -> None:
    if d.get("kind") != expected:
        raise ValueError(f"state_dict is for a {d.get('kind')!r} KL controller, this one is {expected!r}")
