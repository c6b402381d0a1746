"""Named phase timers: every RL step reports where its wall time went."""
from __future__ import annotations

import time
from contextlib import contextmanager


class PhaseTimer:
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
