"""Folders written whole or not at all: built under a temporary name beside their final place, then swapped in.

A reader sees the old folder or the new one, never a half-written one: the new folder is renamed into place
(atomic on POSIX within one filesystem), the old one moved aside first and removed only once the new one is
there. What else makes a folder trustworthy (fsync, a COMPLETE marker, a manifest) is the caller's
(`rlhf_ray.learner.checkpoint.publish`, `rlhf_ray.sync.restore.RestoreWriter`).
"""
from __future__ import annotations

import os
import shutil
import tempfile
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


def process_scratch(root: str | Path, prefix: str) -> Path:
    """A fresh folder `ROOT/PREFIX<pid>_<random>` for this process's scratch files, after removing the folders
    of the same prefix whose process is gone. A role process in a Ray actor is ended by `ray.shutdown` or a kill
    without running its `close`, so its scratch stays behind; the next process of the same kind on that node
    clears it (a folder whose process still runs, or whose name carries no pid, is left alone)."""
    root = Path(root)
    for old in root.glob(f"{prefix}*"):
        pid = old.name[len(prefix):].split("_", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}_", dir=root))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True
