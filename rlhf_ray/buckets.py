"""Packing named weights into flat buckets of bounded size, and unpacking them as zero-copy views.

A weight sync moves many tensors (a Llama layer has 9); sending them one by one pays a per-message
cost per tensor (FIELD.md: 512 MB buckets cut a 70B sync from 200 s to 16 s). A `Bucket` is one flat
contiguous byte buffer holding several tensors back to back, plus a `TensorSpec` per tensor, so one
bucket travels as one object (one `ray.put`, one broadcast). Pure torch: no Ray, no vLLM.

Layout: tensors are placed in arrival order at offsets aligned to `ALIGN` bytes, so that every slice
can be viewed as its own dtype without a copy. Mixed dtypes may share a bucket. A tensor larger than
`bucket_bytes` gets a bucket of its own (a bucket is never split across tensors' halves: receivers
see whole tensors only).

Below every package that moves weights: the sync's transports, the engine's relay to its tensor-parallel
workers and the learner's export (which copies a model to host memory bucket by bucket).
"""
from __future__ import annotations

import json
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
    dtype = getattr(torch, name, None) if name.isidentifier() else None
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype name {name!r} in a bucket spec")
    return dtype


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def pack_buckets(named: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int,
                 dtype: Optional[torch.dtype] = None, reuse: bool = False,
                 device: Optional[torch.device | str] = None) -> Iterator[Bucket]:
    """Yield buckets of at most `bucket_bytes` (or one oversized tensor) from `(name, tensor)` pairs.

    Each tensor is copied once, into the bucket, as soon as it arrives (cast to `dtype` on the way if
    given, e.g. fp32 learner -> bf16 engine), and no reference to it is kept: the producer's copy is
    free before the next one is asked for. The iterator is consumed lazily: a ZeRO-3 learner that
    gathers one parameter at a time holds at most one gathered parameter plus one bucket.

    device: where the buckets live (default: each bucket where its first tensor is). `device="cpu"` for
    tensors on a GPU streams them to host memory tensor by tensor: the device then holds only the tensor
    in flight, never a bucket (a full-weight export: `rlhf_ray.learner.export`).

    reuse=True packs every bucket into the same buffer: a consumer that copies each bucket away
    before asking for the next (`ray.put`, a broadcast) then touches fresh memory once instead of
    once per bucket (first-touch page faults made fresh buffers 3x slower than a warm copy here).
    A yielded bucket is only valid until the next one is requested.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes}")
    buffer: Optional[torch.Tensor] = None      # the bucket being filled (capacity >= its end)
    arena: Optional[torch.Tensor] = None       # reuse: the one buffer every bucket is packed into
    specs: list[TensorSpec] = []
    end = 0
    for name, tensor in named:
        tensor = tensor.detach()
        out_dtype = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
        nbytes = tensor.numel() * out_dtype.itemsize
        offset = _aligned(end)
        if specs and offset + nbytes > bucket_bytes:
            yield Bucket(buffer[:end], tuple(specs))
            buffer, specs, offset = None, [], 0
        if buffer is None:
            where = torch.device(device) if device is not None else tensor.device
            size = max(nbytes, bucket_bytes)
            if not reuse:
                buffer = torch.empty(size, dtype=torch.uint8, device=where)
            else:
                if arena is None or arena.numel() < size or arena.device != where:
                    arena = None  # drop the old one before allocating its successor
                    arena = torch.empty(size, dtype=torch.uint8, device=where)
                buffer = arena
        dst = buffer[offset:offset + nbytes].view(out_dtype).view(tensor.shape)
        dst.copy_(tensor)  # cast and device move in one copy
        specs.append(TensorSpec(name, tuple(tensor.shape), str(out_dtype).removeprefix("torch."), offset, nbytes))
        end = offset + nbytes
        del tensor, dst  # the producer's tensor is not kept alive while the next one is made
    if specs:
        yield Bucket(buffer[:end], tuple(specs))


# -- the header that describes a bucket on the wire: JSON, never pickle ------------------------------
MAX_HEADER_BYTES = 64 << 20   # a 70B model's specs are about 100 kB; anything near this is not a header


def encode_specs(specs: tuple[TensorSpec, ...]) -> bytes:
    """The specs as JSON bytes: a list of [name, shape, dtype, offset, nbytes]."""
    return json.dumps([[s.name, list(s.shape), s.dtype, s.offset, s.nbytes] for s in specs],
                      separators=(",", ":")).encode()


def decode_specs(raw: bytes, buffer_bytes: int) -> tuple[TensorSpec, ...]:
    """Specs from `encode_specs` bytes received from a peer, checked against the buffer they describe.

    Refuses (ValueError) anything that is not that JSON: a pickled payload, unknown dtypes, shapes whose
    size disagrees with the byte count, or slices outside the buffer. Nothing is evaluated or unpickled.
    """
    if len(raw) > MAX_HEADER_BYTES:
        raise ValueError(f"bucket header of {len(raw)} bytes refused (limit {MAX_HEADER_BYTES})")
    try:
        rows = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"bucket header is not the JSON spec list ({e.__class__.__name__}); refused "
                         f"(a pickled header from an older or foreign sender?)") from None
    if not isinstance(rows, list):
        raise ValueError("bucket header must be a JSON list of tensor specs")
    specs = []
    for row in rows:
        if not (isinstance(row, list) and len(row) == 5):
            raise ValueError(f"bad tensor spec {row!r} in a bucket header")
        name, shape, dtype, offset, nbytes = row
        if not (isinstance(name, str) and isinstance(shape, list) and isinstance(dtype, str)
                and all(type(d) is int and d >= 0 for d in shape) and type(offset) is int and type(nbytes) is int):
            raise ValueError(f"bad tensor spec {row!r} in a bucket header")
        itemsize = dtype_of(dtype).itemsize
        numel = 1
        for d in shape:
            numel *= d
        if nbytes != numel * itemsize or offset < 0 or offset % ALIGN or offset + nbytes > buffer_bytes:
            raise ValueError(f"tensor spec {name!r} ({dtype}{shape}, {nbytes} B at {offset}) does not fit a "
                             f"{buffer_bytes}-byte bucket")
        specs.append(TensorSpec(name, tuple(shape), dtype, offset, nbytes))
    return tuple(specs)


def unpack_bucket(bucket: Bucket) -> list[tuple[str, torch.Tensor]]:
    """`(name, tensor)` views into the bucket's buffer: no copy; they live as long as the buffer."""
    out = []
    for spec in bucket.specs:
        raw = bucket.buffer[spec.offset:spec.offset + spec.nbytes]
        out.append((spec.name, raw.view(dtype_of(spec.dtype)).view(spec.shape)))
    return out


def total_bytes(buckets: Iterable[Bucket]) -> int:
    return sum(sum(s.nbytes for s in b.specs) for b in buckets)
