"""RL checkpoints: one atomic folder per step holding every role's state and the controller's.

    checkpoints/step_000010/{policy/, critic/, controller.json, COMPLETE}

Written under a temporary name and renamed into place with a COMPLETE marker, so a run killed while
saving leaves the previous checkpoint as the latest complete one, never a half-written one.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

from rlhf_ray.learner.checkpoint import latest_checkpoint, publish, temp_dir_for, write_json

KEEP = 2


def save(roles, root: Path, step: int, controller_state: dict) -> Path:
    final = root / f"step_{step:06d}"
    tmp = temp_dir_for(final)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    roles.save(str(tmp), {"step": step})
    write_json(tmp / "controller.json", controller_state)
    publish(tmp, final)
    older = sorted(p for p in root.glob("step_*") if p != final)
    for old in older[:max(0, len(older) - (KEEP - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load(roles, root: Path) -> Optional[tuple[Path, dict]]:
    """Restore the latest complete checkpoint under `root`; None when there is none."""
    ckpt = latest_checkpoint(root)
    if ckpt is None:
        return None
    roles.load(str(ckpt))
    return ckpt, json.loads((ckpt / "controller.json").read_text())
