"""Write HF folders from named tensors (rank 0 only; the caller gathers them), streamed to host memory.

The tensors come one at a time from the learner's device (`rlhf_ray.learner.weights`: a gathered ZeRO-3
module, a dequantized 4-bit base, a merged LoRA layer). Each is copied into a host bucket as it arrives
and released (`pack_buckets(..., device="cpu")`), so the device holds one tensor in flight, never the
model: a 70B merged export on one 80 GB GPU, or the 4090's dequantized base beside the learner. On the
host, size-capped safetensors shards (`rlhf_ray.models.export.hf.write_sharded`) bound memory to one
shard plus one bucket.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Iterable, Iterator

import torch

from rlhf_ray.buckets import pack_buckets, unpack_bucket

NamedTensor = tuple[str, torch.Tensor]
EXPORT_BUCKET_BYTES = 256 << 20   # one host copy per bucket's worth of tensors
SHARD_BYTES = 2 << 30             # what transformers' own save_pretrained writes per file (about)


def to_host(named: Iterable[NamedTensor], bucket_bytes: int = EXPORT_BUCKET_BYTES) -> Iterator[NamedTensor]:
    """`(name, host tensor)` for each `(name, device tensor)`: copied bucket by bucket into host memory,
    each device tensor released before the next is asked for. The host tensors are views into their
    bucket (a bucket's memory lives while any of its tensors does)."""
    for bucket in pack_buckets(named, bucket_bytes, device="cpu"):
        yield from unpack_bucket(bucket)


def write_full(out: Path, named: Iterable[NamedTensor], config, architecture: str,
               bucket_bytes: int = EXPORT_BUCKET_BYTES, shard_bytes: int = SHARD_BYTES) -> int:
    """The full model as safetensors shards + config.json; returns the number of shards."""
    from rlhf_ray.models.export.hf import write_sharded
    dtypes: set[torch.dtype] = set()

    def noted():
        for name, t in to_host(named, bucket_bytes):
            if t.is_floating_point():
                dtypes.add(t.dtype)
            yield name, t

    shards = write_sharded(noted(), out, shard_bytes)
    cfg = copy.deepcopy(config)
    cfg.__dict__.pop("quantization_config", None)  # the export is full precision, whatever the base was
    cfg.architectures = [architecture]
    cfg.dtype = str(next(iter(dtypes))).removeprefix("torch.") if len(dtypes) == 1 else "float32"
    cfg.use_cache = True
    cfg.save_pretrained(out)
    return shards


def write_adapter(out: Path, named: Iterable[NamedTensor], peft_config, base_path: str) -> None:
    from safetensors.torch import save_file
    cfg = copy.deepcopy(peft_config)
    cfg.base_model_name_or_path = base_path
    cfg.inference_mode = True
    cfg.save_pretrained(str(out))
    save_file(dict(to_host(named)), str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
