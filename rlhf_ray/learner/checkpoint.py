"""Atomic checkpoint folders and the RNG state that goes into them.

A checkpoint is written into `.NAME.tmp` beside its final place; every file and the folder are
fsync'ed, then a `COMPLETE` marker is written and fsync'ed, then the folder is renamed into place
(atomic on POSIX) and the parent is fsync'ed. A crash at any moment leaves either no `NAME`, or the
previous `NAME`, or a complete one: a folder without `COMPLETE` is never loaded.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Optional

import torch

MARKER = "COMPLETE"


def temp_dir_for(final: str | Path) -> Path:
    final = Path(final)
    return final.parent / f".{final.name}.tmp"


def fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(tmp: Path, final: Path) -> None:
    """fsync `tmp`, mark it complete, rename it to `final` (replacing an older `final`)."""
    fsync_tree(tmp)
    marker = tmp / MARKER
    with open(marker, "w") as f:
        f.write("ok\n")
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    if final.exists():
        old = final.parent / f".{final.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)  # the old one stays complete until the new one is in place
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync_dir(final.parent)


def is_complete(path: str | Path) -> bool:
    return (Path(path) / MARKER).is_file()


def latest_checkpoint(root: str | Path) -> Optional[Path]:
    """The complete `step_NNNNNN` folder with the highest step under `root`, if any."""
    root = Path(root)
    if not root.is_dir():
        return None
    steps = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := re.fullmatch(r"step_(\d+)", p.name)) and is_complete(p)]
    return max(steps)[1] if steps else None


def prune_checkpoints(root: str | Path, keep: int) -> None:
    """Delete all but the `keep` newest `step_NNNNNN` folders under `root` (the one pruning rule)."""
    steps = sorted(p for p in Path(root).glob("step_*") if p.is_dir())
    for old in steps[:max(0, len(steps) - keep)]:
        shutil.rmtree(old, ignore_errors=True)


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=1, sort_keys=True))


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np
        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np
        np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
