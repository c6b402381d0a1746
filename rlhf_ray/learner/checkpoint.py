"""Atomic checkpoint folders and the RNG state that goes into them.

A checkpoint is written into `.NAME.tmp` beside its final place; every file and the folder are
fsync'ed, then a `COMPLETE` marker is written and fsync'ed, then the folder is renamed into place
(atomic on POSIX) and the parent is fsync'ed. A crash at any moment leaves either no `NAME`, or the
previous `NAME`, or a complete one: a folder without `COMPLETE` is never loaded.

Before the marker, a `MANIFEST.json` records every file's size and SHA-256, so a checkpoint damaged
after it was written (a truncated copy, a flipped disk block) is recognised before it is loaded.
Nothing is unpickled: RNG state is JSON, and DeepSpeed's own files load with `weights_only=True`.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Optional

import torch

from rlhf_ray.errors import RunError
from rlhf_ray.utils.folders import fresh_dir, swap_in, temp_dir_for  # noqa: F401 - the checkpoints' folder rules

MARKER = "COMPLETE"
MANIFEST = "MANIFEST.json"
KEEP = 2  # the newest checkpoints kept of a stage, RL and offline alike (older ones are pruned)


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
    write_manifest(tmp)
    fsync_tree(tmp)
    marker = tmp / MARKER
    with open(marker, "w") as f:
        f.write("ok\n")
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    swap_in(tmp, final)  # an older one stays complete until the new one is in place
    _fsync_dir(final.parent)


def is_complete(path: str | Path) -> bool:
    return (Path(path) / MARKER).is_file()


def complete_checkpoints(root: str | Path) -> list[Path]:
    """The complete `step_NNNNNN` folders under `root`, newest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    steps = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := re.fullmatch(r"step_(\d+)", p.name)) and is_complete(p)]
    return [p for _, p in sorted(steps, reverse=True)]


def latest_checkpoint(root: str | Path) -> Optional[Path]:
    """The complete `step_NNNNNN` folder with the highest step under `root`, if any."""
    found = complete_checkpoints(root)
    return found[0] if found else None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.is_file() and p.name not in (MARKER, MANIFEST))


def write_manifest(root: Path) -> None:
    """Size and SHA-256 of every file under `root` (nested checkpoints keep their own manifests too)."""
    entries = {rel: [(root / rel).stat().st_size, _sha256(root / rel)] for rel in _files(root)}
    write_json(root / MANIFEST, entries)


def damage(path: str | Path) -> Optional[str]:
    """What is wrong with the checkpoint at `path` (a missing, resized or altered file), or None if it
    matches its manifest. A folder written before manifests existed is taken as it is."""
    path = Path(path)
    if not (path / MANIFEST).is_file():
        return None
    try:
        entries = json.loads((path / MANIFEST).read_text())
    except ValueError:
        return f"{path / MANIFEST} is not valid JSON"
    for rel, (size, digest) in entries.items():
        f = path / rel
        if not f.is_file():
            return f"{rel} is missing"
        if f.stat().st_size != size:
            return f"{rel} has {f.stat().st_size} bytes, {size} were written"
        if _sha256(f) != digest:
            return f"{rel} does not match the checksum written with it"
    return None


def prune_checkpoints(root: str | Path, keep: int = KEEP) -> None:
    """Delete all but the `keep` newest `step_NNNNNN` folders under `root` (the one pruning rule)."""
    steps = sorted(p for p in Path(root).glob("step_*") if p.is_dir())
    for old in steps[:max(0, len(steps) - keep)]:
        shutil.rmtree(old, ignore_errors=True)


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=1, sort_keys=True))


def rng_state() -> dict:
    """Every RNG this process draws from, as plain JSON values (loading it runs no code)."""
    version, internal, gauss = random.getstate()
    state = {"python": [version, list(internal), gauss], "torch": torch.get_rng_state().tolist()}
    try:
        import numpy as np
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]
    except ImportError:
        pass
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "numpy" in state:
        import numpy as np
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def save_rng(path: Path) -> None:
    write_json(path, rng_state())


def load_rng(path: Path) -> None:
    set_rng_state(json.loads(path.read_text()))


def weights_only_loads(engine) -> None:
    """Make a DeepSpeed engine read its checkpoint files with `torch.load(weights_only=True)`: tensors,
    containers and numbers only, no arbitrary objects (DeepSpeed's own loader unpickles freely)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    current = getattr(engine, "checkpoint_engine", None)
    if current is None or type(current) is not TorchCheckpointEngine:
        return  # another engine (e.g. async or NVMe): leave it as configured
    current.load = lambda path, map_location=None: _load_weights_only(path, map_location)


def _deepspeed_data_classes() -> list:
    """DeepSpeed classes its optimizer files hold: plain records (a loss-scale record, an enum, a
    dataclass of offsets), safe to rebuild from their fields; allowlisted by name, nothing else."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    return [LossScaler, ZeroStageEnum, fragment_address]


def _load_weights_only(path: str, map_location=None):
    try:
        with torch.serialization.safe_globals(_deepspeed_data_classes()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - one line naming the file, whatever the unpickler says
        raise CheckpointError(f"{path} does not load as weights only ({type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}); it may be damaged "
                              f"or hold objects other than tensors") from None


class CheckpointError(RunError, RuntimeError):
    """A checkpoint that cannot be written or read; the message names the folder or file."""
