"""Hub ids (`org/name`) in model paths, resolved through the local Hugging Face hub cache.

The cache is huggingface_hub's own layout (`$HF_HUB_CACHE/models--org--name/{refs/main, snapshots/<sha>/}`),
so a model pre-downloaded with `hf download org/name` is found as is. Online, a missing model is
downloaded into that cache; offline (HF_HUB_OFFLINE=1, which every role process runs with), a missing
model is one line saying how to pre-download it. Only the driver resolves: roles receive folders.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

from rlhf_ray.errors import RunError

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


class HubModelMissing(RunError, FileNotFoundError):
    """A hub id that is neither cached nor downloadable here."""


def is_hub_id(spec: str) -> bool:
    """`org/name` that is not an existing local path (a local folder of that name wins)."""
    return bool(_HUB_ID.match(spec)) and not Path(spec).exists()


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def cached_snapshot(spec: str, files: Optional[list[str]] = None) -> Optional[str]:
    """The snapshot folder of `spec` in the local hub cache holding `files`, or None (never downloads)."""
    from huggingface_hub import snapshot_download
    try:
        folder = snapshot_download(spec, local_files_only=True, allow_patterns=files)
    except Exception:  # noqa: BLE001 - any miss in the cache
        return None
    return str(folder) if all((Path(folder) / f).exists() for f in files or ()) else None


def resolve_hub_id(spec: str, files: Optional[list[str]] = None) -> str:
    """The snapshot folder of hub id `spec`. `files`: only these (e.g. ["config.json"] for a plan)."""
    from huggingface_hub import constants, snapshot_download
    folder = cached_snapshot(spec, files)
    if folder is None:  # not cached: download if we may, else say how
        if _offline():
            raise HubModelMissing(
                f"model {spec!r} is a hub id that is not in the local hub cache ({constants.HF_HUB_CACHE}) and "
                f"downloads are off (HF_HUB_OFFLINE=1); pre-download it where the hub is reachable with "
                f"`hf download {spec}` into the same HF_HUB_CACHE, or point the config at a local folder") from None
        folder = snapshot_download(spec, allow_patterns=files)
    if files and not all((Path(folder) / f).exists() for f in files):
        raise HubModelMissing(f"model {spec!r}: the cached snapshot {folder} lacks {files}; "
                              f"pre-download it with `hf download {spec}`")
    return str(folder)
