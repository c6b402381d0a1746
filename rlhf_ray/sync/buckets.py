"""Packing named weights into flat buckets of bounded size, and unpacking them as zero-copy views.

A weight sync moves many tensors (a Llama layer has 9); sending them one by one pays a per-message
cost per tensor (FIELD.md: 512 MB buckets cut a 70B sync from 200 s to 16 s). A `Bucket` is one flat
contiguous byte buffer holding several tensors back to back, plus a `TensorSpec` per tensor, so one
bucket travels as one object (one `ray.put`, one broadcast). Pure torch: no Ray, no vLLM.

Layout: tensors are placed in arrival order at offsets aligned to `ALIGN` bytes, so that every slice
can be viewed as its own dtype without a copy. Mixed dtypes may share a bucket. A tensor larger than
`bucket_bytes` gets a bucket of its own (a bucket is never split across tensors' halves: receivers
see whole tensors only).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

import torch

ALIGN = 64  # bytes; a multiple of every dtype's size and of a cache line


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str          # torch dtype name without the "torch." prefix, e.g. "float32"
    offset: int         # byte offset into the bucket's buffer, a multiple of ALIGN
    nbytes: int


@dataclass(frozen=True)
class Bucket:
    buffer: torch.Tensor              # (N,) uint8, contiguous; N = end of the last tensor
    specs: tuple[TensorSpec, ...]

    @property
    def nbytes(self) -> int:
        return self.buffer.numel()


def dtype_of(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype name {name!r} in a bucket spec")
    return dtype


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def pack_buckets(named: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int,
                 dtype: Optional[torch.dtype] = None, reuse: bool = False) -> Iterator[Bucket]:
    """Yield buckets of at most `bucket_bytes` (or one oversized tensor) from `(name, tensor)` pairs.

    Each tensor is copied once, into the bucket (cast to `dtype` on the way if given, e.g. fp32
    learner -> bf16 engine). The iterator is consumed lazily: a ZeRO-3 learner that gathers one
    parameter at a time holds at most one gathered parameter plus one bucket.

    reuse=True packs every bucket into the same buffer: a consumer that copies each bucket away
    before asking for the next (`ray.put`, a broadcast) then touches fresh memory once instead of
    once per bucket (first-touch page faults made fresh buffers 3x slower than a warm copy here).
    A yielded bucket is only valid until the next one is requested.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes}")
    pending: list[tuple[str, torch.Tensor, int]] = []   # (name, tensor, offset)
    end = 0
    arena: list = [None, bucket_bytes] if reuse else []     # [buffer, its minimum size]
    for name, tensor in named:
        tensor = tensor.detach()
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        nbytes = tensor.numel() * tensor.element_size()
        offset = _aligned(end)
        if pending and offset + nbytes > bucket_bytes:
            yield _fill(pending, end, arena)
            pending, offset = [], 0
        pending.append((name, tensor, offset))
        end = offset + nbytes
    if pending:
        yield _fill(pending, end, arena)


def _fill(pending: list[tuple[str, torch.Tensor, int]], end: int, arena: list) -> Bucket:
    device = pending[0][1].device
    if arena:  # reuse: grow the one buffer when needed, hand out a prefix view of it
        if arena[0] is None or arena[0].numel() < end or arena[0].device != device:
            arena[0] = torch.empty(max(end, arena[1]), dtype=torch.uint8, device=device)
        buffer = arena[0][:end]
    else:
        buffer = torch.empty(end, dtype=torch.uint8, device=device)
    specs = []
    for name, tensor, offset in pending:
        nbytes = tensor.numel() * tensor.element_size()
        dst = buffer[offset:offset + nbytes].view(tensor.dtype).view(tensor.shape)
        dst.copy_(tensor)
        specs.append(TensorSpec(name, tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."), offset, nbytes))
    return Bucket(buffer, tuple(specs))


def unpack_bucket(bucket: Bucket) -> list[tuple[str, torch.Tensor]]:
    """`(name, tensor)` views into the bucket's buffer: no copy; they live as long as the buffer."""
    out = []
    for spec in bucket.specs:
        raw = bucket.buffer[spec.offset:spec.offset + spec.nbytes]
        out.append((spec.name, raw.view(dtype_of(spec.dtype)).view(spec.shape)))
    return out


def total_bytes(buckets: Iterable[Bucket]) -> int:
    return sum(sum(s.nbytes for s in b.specs) for b in buckets)
