"""Accounting of the bytes a producer's tensors keep alive, for memory-bound tests on CPU.

A stand-in for device memory: each tensor a `LiveBytes` source yields is backed by a numpy array
(`torch.from_numpy`), which stays alive exactly as long as some tensor still uses its storage (views,
`.detach()`, `.to()` of the same dtype and device all share it). The arrays are weakly referenced, so
`alive()` is the bytes of the producer's tensors that a consumer still holds, whatever Python object
holds them. A copy into the consumer's own buffer (a bucket on the host) is not counted.
"""
from __future__ import annotations

import weakref

import numpy as np
import torch


class LiveBytes:
    def __init__(self):
        self._refs: list[tuple[weakref.ref, int]] = []
        self.peak = 0
        self.made = 0

    def tensor(self, shape, value: float = 0.0, dtype=np.float32) -> torch.Tensor:
        arr = np.full(shape, value, dtype=dtype)
        self._refs.append((weakref.ref(arr), arr.nbytes))
        self.made += arr.nbytes
        t = torch.from_numpy(arr)
        del arr
        self.peak = max(self.peak, self.alive())
        return t

    def copy(self, t: torch.Tensor) -> torch.Tensor:
        """A tracked copy of `t` (same values, dtype and shape; dtypes numpy has)."""
        np_dtype = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64}[t.dtype]
        return self.tensor(tuple(t.shape), dtype=np_dtype).copy_(t)

    def alive(self) -> int:
        return sum(n for r, n in self._refs if r() is not None)

    def source(self, named_shapes, on_each=None):
        """`(name, tensor)` for each `(name, shape)`; the peak is read as each new tensor is made, i.e. with
        everything the consumer still holds of the earlier ones. on_each(): called before each new tensor."""
        for k, (name, shape) in enumerate(named_shapes):
            if on_each is not None:
                on_each()
            yield name, self.tensor(shape, float(k))
