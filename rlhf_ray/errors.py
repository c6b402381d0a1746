"""Errors whose message is written for the operator: the CLI prints them in one paragraph, no traceback.

Each names what is wrong (the key, the file and row, the weight version, the reward source) and what to
change. Raised inside a Ray actor they reach the driver wrapped; `unwrap` recovers them.
"""
from __future__ import annotations


class RunError(Exception):
    """Base class of every error the operator can act on."""


def unwrap(exc: BaseException) -> BaseException:
    """The original error behind Ray's task/actor wrappers."""
    seen = 0
    while seen < 5 and getattr(exc, "cause", None) is not None and type(exc).__module__.startswith("ray"):
        exc, seen = exc.cause, seen + 1
    return exc
