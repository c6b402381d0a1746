"""What the GPU tier shares: markers that skip without CUDA (or without enough GPUs, or a library), and the
device memory in use as the driver sees it (every process on the GPU, CUDA contexts included)."""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch


def gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def tier(min_gpus: int = 1, *libraries: str) -> list:
    """`pytestmark` of a GPU module: marked `gpu` and `slow`, skipped unless CUDA shows `min_gpus` and
    every library named is installed."""
    missing = [m for m in libraries if importlib.util.find_spec(m) is None]
    return [pytest.mark.gpu, pytest.mark.slow,
            pytest.mark.skipif(gpus() < min_gpus, reason=f"needs {min_gpus} CUDA GPU(s), found {gpus()}"),
            pytest.mark.skipif(bool(missing), reason=f"needs {', '.join(missing)}")]


def used_bytes(device: int = 0) -> int:
    """Device memory in use by every process (what `nvidia-smi` shows), not only this one's allocator."""
    free, total = torch.cuda.mem_get_info(device)
    return total - free


def join_world(rank: int, world: int, port: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
