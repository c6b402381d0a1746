"""Phases of an RL step: the controller's named timer per phase (`PhaseTimer`), and what every role's Ray shell
does around a phase: take its share of the cores and time its own compute."""
from __future__ import annotations

import itertools
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager
from typing import Callable, Optional, Sequence, TypeVar

import torch

# vLLM's CPU worker replaces `torch.set_num_threads` with a no-op for the whole process when an engine
# starts in it (vllm/v1/worker/cpu_worker.py); a colocated process still picks threads per phase.
_set_num_threads = torch.set_num_threads


# The cores this process may use, as it started; `cores` slices index into this list, so the same slice
# means the same share on every node whatever its core ids.
_ALL_CORES = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
_pinned: list[Optional[list[int]]] = [None]


def set_phase_threads(n: int, cores: Optional[tuple[int, Optional[int]]] = None) -> None:
    """Use n threads for the phase about to run (0: leave as is). The controller hands each role its share
    of the node's cores: roles running side by side split them, a role running alone takes them all.
    `cores` = (start, stop) pins the process to that slice of its cores, so that two roles running at once
    (the next rollout during an update) work on disjoint cores instead of preempting each other's
    OpenMP teams; None gives it every core again."""
    if n and torch.get_num_threads() != n:
        _set_num_threads(n)
    want = _ALL_CORES[slice(*cores)] if cores is not None else _ALL_CORES
    if want and want != (_pinned[0] or _ALL_CORES):
        for tid in os.listdir("/proc/self/task"):  # every thread: OpenMP workers keep the mask they had
            try:
                os.sched_setaffinity(int(tid), want)
            except OSError:  # a thread that just ended
                pass
        _pinned[0] = want


def set_thread_share(n: int, cores: Optional[tuple[int, Optional[int]]] = None) -> None:
    """For one of two phases running at once in ONE process (a colocated rank sampling the next step while
    it trains): n threads for the calling thread's own OpenMP teams (the team size is a per-thread setting)
    and the calling thread alone pinned to its slice of the cores, so the other phase's thread keeps its
    own. OpenMP workers this thread started earlier keep the mask they were created with: exact when n is 1
    (no workers), as on a 2-core node."""
    _set_num_threads(n)
    want = _ALL_CORES[slice(*cores)] if cores is not None else _ALL_CORES
    if want:
        os.sched_setaffinity(threading.get_native_id(), want)
    _pinned[0] = [-1]  # the threads differ now: the next set_phase_threads pins them all again


def side_by_side(threads: int, first: int) -> tuple[tuple[int, Optional[tuple[int, int]]], ...]:
    """(threads, cores) of two phases that share `threads` cores at once: the first gets `first` of them
    (at least one, and one left for the second), the second the rest; one core cannot be split."""
    if threads < 2:
        return (1, None), (1, None)
    a = min(max(1, first), threads - 1)
    return (a, (0, a)), (threads - a, (a, threads))


T = TypeVar("T")
R = TypeVar("R")


class CoreTeam:
    """Parts of one phase's work side by side on the process's cores: one thread per share (the plan's
    `PhaseShares.score_rows`: one core and a one-thread OpenMP team each), `map(fn, parts)` in part order.

    Why: on host cores a small model's no-grad forward split by rows over the cores beats one OpenMP team over
    all of them: its GEMMs lose nothing to the team's fork and join, and its element-wise kernels, below
    torch's grain size, run on one core of a team but here on every core. AMD EPYC Zen 5, 2 cores, in the
    colocated rank, team against one team of 2 threads: the tiny PPO task's three scoring passes 121 -> 113 ms;
    SmolLM2-135M's LoRA reference pass (GRPO, 8 x 4 x 48 tokens) 2.99 -> 2.76 s in fp32, 0.93 -> 0.83 s in bf16
    (a bare forward of 32 x 112 tokens outside a run: 1.78 -> 1.33 s in bf16); the tiny GRPO reference pass
    unchanged. Each part runs in the caller's grad mode (torch keeps it per thread). No shares, or one: the
    parts run on the caller's thread, one after the other."""

    def __init__(self, shares: Sequence = ()):
        self.shares = tuple(shares)
        self._pool: Optional[ThreadPoolExecutor] = None
        self._local = threading.local()
        self._next = itertools.count()

    @property
    def size(self) -> int:
        """How many parts run at once."""
        return max(1, len(self.shares))

    def map(self, fn: Callable[[T], R], parts: Sequence[T]) -> list[R]:
        if self.size == 1 or len(parts) < 2:
            return [fn(p) for p in parts]
        if self._pool is None:  # its threads live as long as the process: their OpenMP state is made once
            self._pool = ThreadPoolExecutor(self.size, thread_name_prefix="core-team", initializer=self._own_share)
        grad = torch.is_grad_enabled()
        done = [self._pool.submit(self._run, fn, p, grad) for p in parts]
        wait(done)  # every part stopped before an error in one is raised
        return [f.result() for f in done]

    def _own_share(self) -> None:
        self._local.share = self.shares[next(self._next) % len(self.shares)]

    def _run(self, fn, part, grad: bool):
        # pinned again for each part: a phase started since (`set_phase_threads`) re-pins every thread
        share = self._local.share
        set_thread_share(share.threads, share.cores)
        with torch.set_grad_enabled(grad):
            return fn(part)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def node_cores() -> int:
    return len(_ALL_CORES) or os.cpu_count() or 1


def timed(fn, *args):
    """(result, seconds spent computing it in this process): the controller's overhead accounting."""
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


class PhaseTimer:
    """Named phase timers: every RL step reports where its wall time went."""

    def __init__(self):
        self.times: dict[str, float] = {}
        self._start = time.perf_counter()

    @contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - t0

    def stats(self) -> dict[str, float]:
        total = time.perf_counter() - self._start
        out = {f"timing/{k}_s": v for k, v in self.times.items()}
        out["timing/step_s"] = total
        out["timing/other_s"] = max(0.0, total - sum(self.times.values()))
        return out
