"""Folders written whole or not at all: built under a temporary name beside their final place, then swapped in.

A reader sees the old folder or the new one, never a half-written one: the new folder is renamed into place
(atomic on POSIX within one filesystem), the old one moved aside first and removed only once the new one is
there. What else makes a folder trustworthy (fsync, a COMPLETE marker, a manifest) is the caller's
(`rlhf_ray.learner.checkpoint.publish`, `rlhf_ray.sync.restore.RestoreWriter`).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path


def temp_dir_for(final: str | Path, suffix: str = ".tmp") -> Path:
    """Where `final` is written before it is swapped in: `.NAME.tmp` beside it."""
    final = Path(final)
    return final.parent / f".{final.name}{suffix}"


def fresh_dir(path: str | Path) -> Path:
    """An empty folder at `path` (what a crashed earlier write left there is removed)."""
    path = Path(path)
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def swap_in(tmp: str | Path, final: str | Path) -> Path:
    """Rename the written folder `tmp` to `final`, replacing an older `final`: it is moved aside first (kept
    whole until the new one is in place, and put back if the new one cannot be), then removed."""
    tmp, final = Path(tmp), Path(final)
    if final.exists():
        old = temp_dir_for(final, ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        try:
            os.rename(tmp, final)
        except BaseException:
            os.rename(old, final)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    return final
