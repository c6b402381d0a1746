"""Environments by name: `builtin:arith`, `builtin:code`, or a user's `module:Class` (loaded like a reward
function), and the probe episode the preflight runs before Ray starts.

A user class is built as `Class(tools)` once per episode and must have `reset(row)` and `step(turn) -> Reply`
(`rlhf_ray.envs.base`). Every way it can fail (not importable, not a class, missing methods, raising in its
constructor, reset or step, answering something that is not a `Reply`) is one `EnvError` line naming it.
"""
from __future__ import annotations

import importlib
from typing import Callable

from rlhf_ray.envs.base import Environment, EnvError, Tools, check_reply

BUILTIN = "builtin:"
BUILTIN_ENVS = {"arith": "rlhf_ray.envs.arith:ArithEnv", "code": "rlhf_ray.envs.code:CodeEnv"}
# what the probe episode's policy writes: a tool call, then a plain answer
PROBE_TURNS = ("<calc>6 * 7</calc>\n```python\nprint(6 * 7)\n```", "42")


def load_env_class(spec: str) -> type:
    """The class `spec` names (`env.path`)."""
    target = spec
    if spec.startswith(BUILTIN):
        name = spec[len(BUILTIN):]
        if name not in BUILTIN_ENVS:
            raise EnvError(f"env.path: unknown built-in environment {spec!r}; built-ins: "
                           + ", ".join(BUILTIN + n for n in BUILTIN_ENVS))
        target = BUILTIN_ENVS[name]
    module, sep, attr = target.partition(":")
    if not sep or not module or not attr:
        raise EnvError(f"env.path: {spec!r} is not builtin:NAME or module:Class")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise EnvError(f"env.path: environment {spec!r} cannot be imported: {e}") from None
    if not isinstance(cls, type):
        raise EnvError(f"env.path: {spec!r} is a {type(cls).__name__}, not a class")
    missing = [m for m in ("reset", "step") if not callable(getattr(cls, m, None))]
    if missing:
        raise EnvError(f"env.path: environment {spec!r} has no {' and no '.join(missing)} method")
    return cls


def env_factory(spec: str, tools: Tools) -> Callable[[], Environment]:
    """A fresh environment per episode: `Class(tools)`; an error in the constructor names the environment."""
    cls = load_env_class(spec)

    def make() -> Environment:
        try:
            return cls(tools)
        except Exception as e:  # noqa: BLE001 - the user's code: one line naming it
            raise EnvError(f"environment {spec}: {cls.__name__}(tools) raised {type(e).__name__}: {e}") from None
    return make


def probe(spec: str, tools: Tools, row: dict, max_turns: int) -> None:
    """One probe episode on a real prompt row, before Ray starts: construct, reset, answer up to two scripted
    turns; anything unusable is an `EnvError` naming the environment and the call."""
    env = env_factory(spec, tools)()
    call = "reset(row)"
    try:
        env.reset(dict(row))
        for turn in PROBE_TURNS[:max(1, min(2, max_turns))]:
            call = f"step({turn!r})"
            reply = check_reply(spec, env.step(turn))
            if reply.kind == "done":
                break
    except EnvError:
        raise
    except Exception as e:  # noqa: BLE001 - the user's code: one line naming it and the call
        raise EnvError(f"environment {spec}: {call} on the first prompt row raised {type(e).__name__}: {e}") from None
