"""RL checkpoints: one atomic folder per step holding every role's state and the controller's.

    checkpoints/step_000010/{policy/, critic/, controller.json, COMPLETE}

Written under a temporary name and renamed into place with a COMPLETE marker, so a run killed while
saving leaves the previous checkpoint as the latest complete one, never a half-written one. A save that
fails (a full disk) removes its partial folder and stops the run with one line; the previous checkpoint
is pruned only after the new one is in place. A load skips a checkpoint whose files do not match their
manifest (or that fails to load) and falls back to the one before it. A run saves its last step too, so
that `--resume` with a larger `rl.steps` continues a finished stage (`continues_finished`).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
import logging
from typing import Callable, Optional

from rlhf_ray.learner.checkpoint import (CheckpointError, complete_checkpoints, damage, fresh_dir, is_complete,
                                         latest_checkpoint, prune_checkpoints, publish, temp_dir_for, write_json)

log = logging.getLogger(__name__)

def save(roles, root: Path, step: int, controller_state: dict) -> Path:
    final = root / f"step_{step:06d}"
    tmp = temp_dir_for(final)
    try:
        fresh_dir(tmp)
        roles.save(str(tmp))
        write_json(tmp / "controller.json", controller_state)
        publish(tmp, final)
    except Exception as e:  # noqa: BLE001 - a full disk surfaces as OSError here or wrapped by Ray
        from rlhf_ray.errors import unwrap
        shutil.rmtree(tmp, ignore_errors=True)
        previous = [p for p in complete_checkpoints(root) if p != final]
        kept = f"the previous checkpoint {previous[0]} is intact" if previous else "no earlier checkpoint exists"
        cause = unwrap(e)
        raise CheckpointError(f"the checkpoint of step {step} could not be written ({type(cause).__name__}: "
                              f"{str(cause).strip().splitlines()[-1] if str(cause).strip() else ''}); {kept}") from None
    prune_checkpoints(root)  # the new one is the newest: it is kept
    return final


def load(roles, root: Path, note: Callable[[str], None] = log.warning) -> Optional[tuple[Path, dict]]:
    """Restore the newest complete checkpoint under `root` that is intact and loads; None when there is
    no complete checkpoint. Damaged ones are skipped (and said so); when all are, one line says why."""
    found = complete_checkpoints(root)
    problems = []
    for ckpt in found:
        problem = damage(ckpt)
        if problem is None:
            try:
                state = json.loads((ckpt / "controller.json").read_text())
                roles.load(str(ckpt))
                return ckpt, state
            except Exception as e:  # noqa: BLE001 - any failure to read it: try the one before
                from rlhf_ray.errors import unwrap
                cause = unwrap(e)
                problem = f"{type(cause).__name__}: {str(cause).strip().splitlines()[0] if str(cause).strip() else ''}"
        problems.append(f"{ckpt.name}: {problem}")
        note(f"checkpoint {ckpt} is damaged ({problem}); trying the one before it")
    if problems:
        raise CheckpointError(f"no checkpoint under {root} can be loaded ({'; '.join(problems)}); "
                              f"start fresh without --resume, or restore the folder")
    return None


def continues_finished(out: Path, steps: int) -> bool:
    """On `--resume` of a finished RL stage (`out/model` written): True when `steps` (rl.steps) asks for
    more steps than the stage ran and its checkpoint of the last step is there to continue from; False when
    nothing is left to do. More steps without that checkpoint (a run from before final checkpoints, or one
    with rl.save_every=0) is refused in one line."""
    ran = steps_ran(out)
    if not is_complete(out / "model") or ran is None or steps <= ran:
        return False
    latest = latest_checkpoint(out / "checkpoints")
    if latest is None or int(latest.name[len("step_"):]) != ran:
        kept = f"its latest checkpoint is {latest.name}" if latest else "it kept no checkpoint"
        raise CheckpointError(f"rl.steps={steps}: the finished RL stage in {out} ran {ran} steps and {kept}, so it "
                              f"cannot continue to step {steps}; start a new RL stage from its policy instead "
                              f"(run.stages=[rl] rl.init_from={out / 'model'} and another run.output_dir)")
    return True


def steps_ran(out: Path) -> Optional[int]:
    """`rl.steps` of the run recorded in `out/run_config.json` (the last one started there), if any."""
    try:
        return int(json.loads((out / "run_config.json").read_text())["rl"]["steps"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
