"""Weight buckets in a form that crosses a process boundary: safetensors files (or bytes) and the
`collective_rpc` payload that tells a tensor-parallel vLLM engine to load them.

Why: with TP > 1 vLLM runs its workers in separate processes and `collective_rpc` arguments travel as
msgpack, where tensors arrive as raw buffers and a Python iterator cannot travel at all; strings do.
A TP engine's workers normally take the buckets off a broadcast instead (`rlhf_ray.roles.generator.worker_ext`);
this folder is the fallback for a TP engine built with another `worker_extension_cls`
(`rlhf_ray.roles.generator.engine.workers_receive`): the engine actor writes the synced buckets into one
node-local folder (/dev/shm when it fits) and sends the path: `reload_weights(weights_path=folder)` makes
every TP worker read the files and shard its own slice. One folder for the whole sync, one call: vLLM's in-place reload finalizes layer by
layer, so a sync split over several calls would run half-loaded layers.

The files are written straight from a bucket's buffer (no per-tensor copy in Python): the safetensors
layout is an 8-byte header length, a JSON header {name: {dtype, shape, data_offsets}}, then the bytes,
with no holes (so the bucket's alignment padding is left out).
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Iterable

from rlhf_ray.buckets import Bucket

SAFETENSORS_DTYPE = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "float64": "F64", "int64": "I64",
                     "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
                     "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2"}


def _header(bucket: Bucket) -> bytes:
    header, end = {}, 0
    for s in bucket.specs:
        if s.dtype not in SAFETENSORS_DTYPE:
            raise ValueError(f"weight {s.name!r} has dtype {s.dtype}, which safetensors cannot hold")
        header[s.name] = {"dtype": SAFETENSORS_DTYPE[s.dtype], "shape": list(s.shape), "data_offsets": [end, end + s.nbytes]}
        end += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


def _chunks(bucket: Bucket) -> Iterable[memoryview]:
    data = memoryview(bucket.buffer.cpu().numpy())
    return (data[s.offset:s.offset + s.nbytes] for s in bucket.specs)


def to_safetensors_bytes(bucket: Bucket) -> bytes:
    """One bucket as a safetensors blob (for a transport that carries bytes, e.g. a worker extension
    that calls `safetensors.torch.load`)."""
    return _header(bucket) + b"".join(_chunks(bucket))


def write_sync_folder(buckets: Iterable[Bucket], folder: str | Path) -> list[Path]:
    """Write each bucket as `weights-NNNNN.safetensors` into `folder` (created; stale files removed)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("weights-*.safetensors"):
        old.unlink()
    paths = []
    for i, bucket in enumerate(buckets):
        paths.append(write_bucket_file(bucket, folder / f"weights-{i:05d}.safetensors"))
    return paths


def write_bucket_file(bucket: Bucket, path: Path) -> Path:
    """One bucket as one safetensors file (a bucket on a GPU is copied to the host first, one at a time)."""
    with open(path, "wb") as f:
        f.write(_header(bucket))
        for chunk in _chunks(bucket):
            f.write(chunk)
    return path


def reload_payload(folder: str | Path) -> tuple[str, dict[str, Any]]:
    """(method, kwargs) for `llm.collective_rpc(method, kwargs=kwargs)`: only strings and booleans."""
    payload = ("reload_weights", {"weights_path": str(folder), "is_checkpoint_format": True})
    check_rpc_payload(payload[1])
    return payload


def check_rpc_payload(obj: Any, where: str = "kwargs") -> None:
    """Refuse what does not survive msgpack between processes intact: tensors (raw buffers on arrival),
    iterators and other objects. Plain scalars, strings, bytes, lists and str-keyed dicts pass."""
    if obj is None or isinstance(obj, (bool, int, float, str, bytes)):
        return
    if isinstance(obj, (list, tuple)):
        for i, x in enumerate(obj):
            check_rpc_payload(x, f"{where}[{i}]")
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TypeError(f"{where}: key {k!r} is not a string")
            check_rpc_payload(v, f"{where}.{k}")
        return
    raise TypeError(f"{where} is a {type(obj).__name__}, which does not cross to a multiprocess vLLM worker intact; "
                    f"send a path (reload_weights(weights_path=...)) or safetensors bytes")
