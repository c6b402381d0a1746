"""The environment interface: an episode starts from a dataset row; the policy writes a turn; the environment
answers it. Plain Python, no tokens: the episode loop (`rlhf_ray.envs.episode`) owns token ids.

A user environment is a class `Class(tools)` (loaded as `module:Class` by `rlhf_ray.envs.loader`) with

    reset(row: dict) -> None      row: the prompt row (`prompt` and every other column of the dataset)
    step(turn: str) -> Reply      turn: the policy's decoded text of this turn
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal, Mapping, Protocol

from rlhf_ray.errors import RunError

ReplyKind = Literal["tool", "user", "done"]


@dataclass(frozen=True)
class ToolResult:
    """What a tool call returns to the environment: never an exception (a failing tool is an observation)."""
    ok: bool          # False: the tool failed (error, time or memory limit, crash)
    text: str         # the output, or the error, cut to the tool's output limit and marked when cut


# name -> call(input text) -> ToolResult; `rlhf_ray.envs.tools.build_tools` makes them (Ray actors or in process)
Tools = Mapping[str, Callable[[str], ToolResult]]


@dataclass(frozen=True)
class Reply:
    """The environment's answer to one policy turn.

    kind:       "tool" (a tool's result), "user" (another user turn), "done" (the episode is over)
    text:       what the policy reads next (empty for done); written with `env.observation_template`
    reward:     the episode's reward when done (an episode cut by rollout.max_turns or the token budget keeps
                the reward of its last reply)
    tool_calls / tool_errors: counted into the episode's metrics
    """
    kind: ReplyKind
    text: str = ""
    reward: float = 0.0
    tool_calls: int = 0
    tool_errors: int = 0


class Environment(Protocol):
    def reset(self, row: dict) -> None: ...

    def step(self, turn: str) -> Reply: ...


class EnvError(RunError, ValueError):
    """An environment that cannot be loaded or answered something unusable; one line naming it."""

    role = "environment"


def check_reply(name: str, reply: object) -> Reply:
    """`reply` if it is a usable `Reply`, else an `EnvError` naming the environment and what it returned."""
    if not isinstance(reply, Reply):
        raise EnvError(f"environment {name}: step() returned {type(reply).__name__}, not rlhf_ray.envs.base.Reply")
    if reply.kind not in ("tool", "user", "done"):
        raise EnvError(f"environment {name}: Reply.kind {reply.kind!r} is not one of tool, user, done")
    if not isinstance(reply.reward, (int, float)) or not math.isfinite(reply.reward):
        raise EnvError(f"environment {name}: Reply.reward {reply.reward!r} is not a finite number")
    if not isinstance(reply.text, str):
        raise EnvError(f"environment {name}: Reply.text is {type(reply.text).__name__}, not str")
    return reply
