"""Errors whose message is written for the operator: the CLI prints them in one line, no traceback.

Each names what is wrong (the key, the file and row, the weight version, the reward source) and what to
change. Raised inside a Ray actor they reach the driver wrapped; `unwrap` recovers them, and
`describe_failure` turns whatever a step raised (an operator error, an actor that died, a bug) into one
`StepError` line naming the role, the step and the cause. `detail` carries text shown below that line:
the user's own traceback (their reward function), never Ray's.
"""
from __future__ import annotations

import os
import re
import traceback
from typing import Optional


class RunError(Exception):
    """Base class of every error the operator can act on. `detail`: optional lines shown below it."""

    def __init__(self, *args, detail: str = ""):
        super().__init__(*args)
        self.detail = detail


class StepError(RunError):
    """A step of the run failed: `str()` names the role, the step and the cause."""


def unwrap(exc: BaseException) -> BaseException:
    """The original error behind Ray's task/actor wrappers."""
    seen = 0
    while seen < 5 and getattr(exc, "cause", None) is not None and type(exc).__module__.startswith("ray"):
        exc, seen = exc.cause, seen + 1
    return exc


# The frames worth showing an operator are their own code's: not ours, not a library's, not Ray's.
_OURS = os.path.dirname(os.path.abspath(__file__))


def user_traceback(exc: BaseException) -> str:
    """The frames of `exc`'s traceback that lie outside rlhf_ray and installed packages, formatted."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if not f.filename.startswith(_OURS) and "site-packages" not in f.filename
              and "/lib/python" not in f.filename]
    if not frames:
        return ""
    lines = "".join(traceback.format_list(frames)).rstrip()
    return f"  in your code (most recent call last):\n{lines}\n  {type(exc).__name__}: {exc}"


# Ray actor class -> the role the operator knows it by. Unknown classes are named as they are.
ROLE_OF_CLASS = {"RewardActor": "reward", "ReferenceActor": "reference", "PolicyRank": "policy learner",
                 "CriticRank": "critic learner", "GeneratorActor": "generator", "LearnerRank": "learner"}


def _role_from_ray(exc: BaseException, names: dict[str, str]) -> Optional[str]:
    """The role an error came from. Ray's wrappers keep the actor id and class only in their text
    (`ray::RewardActor.score() (pid=.., actor_id=..)`, or `class_name: X` when the process died)."""
    if type(exc).__module__.startswith("ray") or "RayTaskError" in type(exc).__name__:
        text = str(exc)
    else:
        return None
    actor_id = getattr(exc, "actor_id", None)
    m = re.search(r"actor_id[=:] ?([0-9a-f]{16,})", text)
    for candidate in (actor_id, m.group(1) if m else None):
        if candidate and candidate in names:
            return names[candidate]
    m = re.search(r"class_name: (\w+)", text) or re.search(r"ray::(\w+)\.", text)
    if m:
        return ROLE_OF_CLASS.get(m.group(1), m.group(1))
    return None


def _last_line(text: str) -> str:
    lines = [x.strip() for x in str(text).splitlines() if x.strip()]
    return lines[-1] if lines else ""


def describe_failure(exc: BaseException, step: int, names: Optional[dict[str, str]] = None,
                     last_checkpoint: Optional[str] = None) -> RunError:
    """One `StepError` for whatever `step` raised (0: while the roles start). `names`: actor id (hex) ->
    role ("policy learner rank 1")."""
    names = names or {}
    import ray.exceptions as rx
    cause = unwrap(exc)
    # an error that knows its role says so (a reward error is the reward's, in whichever process it ran)
    role = getattr(cause, "role", None) or _role_from_ray(exc, names)
    where = (f"step {step}" if step else "start-up") + (f", {role}" if role else "")
    resume = (f"; last good checkpoint: {last_checkpoint} (rerun with --resume=auto to continue from it)"
              if last_checkpoint else "; no checkpoint was written yet")
    if isinstance(cause, rx.RayActorError):
        if cause.actor_init_failed:  # raised in the actor's __init__: Ray keeps only its text
            return StepError(f"{where}: the {role or 'actor'} failed to start: {_last_line(cause.error_msg)}")
        return StepError(f"{where}: the {role or 'actor'} process died ({_last_line(cause.error_msg)})"
                         f"{resume}")
    if isinstance(cause, StepError):
        return cause
    if isinstance(cause, RunError):
        return StepError(f"{where}: {type(cause).__name__}: {cause}", detail=cause.detail)
    if isinstance(cause, rx.RayError):  # a Ray failure without a user cause (object lost, ...)
        return StepError(f"{where}: {type(cause).__name__}: {_last_line(str(cause))}{resume}")
    return StepError(f"{where}: {type(cause).__name__}: {cause}", detail=user_traceback(cause))
