"""The last synced weights on disk: the point a restarted engine is re-synced from.

Kept in memory (the object store) a restore point costs a model's worth of shared memory on the
learner's node for the whole run, twice while the next sync is put beside it. On disk it costs nothing
while no engine fails: the producer writes each bucket to the folder as it streams it (the engines get
exactly these bytes, cast and filtered), and a `restore.json` manifest makes it whole. A sync that fails
half-way leaves the previous point in place (written beside it, swapped in by rename: `rlhf_ray.utils.folders`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator, Optional

import torch

from rlhf_ray.buckets import Bucket
from rlhf_ray.sync.files import write_bucket_file
from rlhf_ray.utils.folders import fresh_dir, swap_in, temp_dir_for

MANIFEST = "restore.json"


class RestoreWriter:
    """Write a stream of buckets into `folder` while passing them on: `writer.tee(buckets)`, then `commit()`."""

    def __init__(self, folder: str | Path, meta: dict):
        self.final = Path(folder)
        self.tmp = fresh_dir(temp_dir_for(self.final))
        self.meta, self.files, self.bytes = dict(meta), [], 0

    def tee(self, buckets: Iterable[Bucket]) -> Iterator[Bucket]:
        for bucket in buckets:
            name = f"weights-{len(self.files):05d}.safetensors"
            write_bucket_file(bucket, self.tmp / name)   # before it is passed on: a reused buffer is valid now
            self.files.append(name)
            self.bytes += sum(s.nbytes for s in bucket.specs)
            yield bucket

    def commit(self) -> Path:
        (self.tmp / MANIFEST).write_text(json.dumps({**self.meta, "files": self.files, "bytes": self.bytes}))
        return swap_in(self.tmp, self.final)


def read_manifest(folder: str | Path) -> Optional[dict]:
    path = Path(folder) / MANIFEST
    return json.loads(path.read_text()) if path.exists() else None


def read_restore(folder: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """`(name, tensor)` of a committed restore point, one file (one bucket) in memory at a time."""
    from safetensors.torch import load_file
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        raise FileNotFoundError(f"{folder} holds no restore point ({MANIFEST} missing)")
    for name in manifest["files"]:
        yield from load_file(str(folder / name)).items()
