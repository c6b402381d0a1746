"""What every role's Ray shell does around a phase: take its share of the cores and time its own compute."""
from __future__ import annotations

import time

import torch

# vLLM's CPU worker replaces `torch.set_num_threads` with a no-op for the whole process when an engine
# starts in it (vllm/v1/worker/cpu_worker.py); a colocated process still picks threads per phase.
_set_num_threads = torch.set_num_threads


def set_phase_threads(n: int) -> None:
    """Use n threads for the phase about to run (0: leave as is). The controller hands each role its share
    of the node's cores: roles running side by side split them, a role running alone takes them all."""
    if n and torch.get_num_threads() != n:
        _set_num_threads(n)


def timed(fn, *args):
    """(result, seconds spent computing it in this process): the controller's overhead accounting."""
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0
