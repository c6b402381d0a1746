"""RL prompts in a reproducible order with a resumable position (exactly-once across kill and resume).

The order of epoch e is a permutation drawn from seed + e, so the state is two integers: (epoch, pos).
A run resumed from (e, p) sees exactly the prompts the uninterrupted run would have seen next.
"""
from __future__ import annotations

import random
from typing import Sequence


class PromptStream:
    def __init__(self, prompts: Sequence[str], batch_size: int, seed: int):
        if not prompts:
            raise ValueError("the RL prompt set is empty")
        if batch_size > len(prompts):
            raise ValueError(f"rl.prompts_per_step={batch_size} exceeds the {len(prompts)} prompts available")
        self.prompts, self.batch_size, self.seed = list(prompts), batch_size, seed
        self.epoch, self.pos = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(len(self.prompts)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def next_batch(self) -> list[str]:
        """The next batch; an epoch's tail that cannot fill a batch is carried into the next epoch's start."""
        out: list[str] = []
        while len(out) < self.batch_size:
            if self.pos >= len(self._order):
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            take = min(self.batch_size - len(out), len(self._order) - self.pos)
            out += [self.prompts[i] for i in self._order[self.pos:self.pos + take]]
            self.pos += take
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "n": len(self.prompts), "seed": self.seed}

    def load_state_dict(self, d: dict) -> None:
        if d["n"] != len(self.prompts) or d["seed"] != self.seed:
            raise ValueError(f"cannot resume: the checkpoint's prompt set had {d['n']} prompts with seed "
                             f"{d['seed']}, this run has {len(self.prompts)} with seed {self.seed}")
        self.epoch, self.pos = int(d["epoch"]), int(d["pos"])
        self._order = self._permutation(self.epoch)
