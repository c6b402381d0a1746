"""The tools an environment may call: plain classes (`Calculator`, `PythonExecutor`) and their Ray shell
(`ToolActor`), so a run's tool calls leave the driver's process; `build_tools` gives an environment its
`Tools` (name -> call(text) -> ToolResult), as Ray actors in a run and in process for the preflight's probe.

A tool never raises into the episode loop: an error, a time or memory limit, a crash, a dead actor, or an
answer too long all come back as a `ToolResult(ok=False, ...)` the policy reads, cut to the output limit.
"""
from __future__ import annotations

import ast
import operator
from typing import Callable

from rlhf_ray.envs.base import ToolResult, Tools
from rlhf_ray.envs.sandbox import Limits, run_python, truncate

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
MAX_EXPRESSION_CHARS = 200
MAX_POWER = 64          # 10 ** 64 fits; 9 ** 9 ** 9 would not end


def evaluate(expression: str) -> float | int:
    """The value of an arithmetic expression (numbers, + - * / // % **, parentheses), without `eval`:
    the tree is walked and anything else is refused with a ValueError naming it."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ValueError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    tree = ast.parse(expression.strip().replace("^", "**").replace("×", "*").replace("÷", "/"), mode="eval")

    def walk(node):
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            left, right = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > MAX_POWER:
                raise ValueError(f"exponent {right} is larger than {MAX_POWER}")
            return _BINARY[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](walk(node.operand))
        raise ValueError(f"unsupported syntax: {type(node).__name__}")

    return walk(tree)


def format_number(x: float | int) -> str:
    """An integer-valued result without '.0'; others to 6 significant digits."""
    if isinstance(x, float) and x.is_integer() and abs(x) < 1e15:
        return str(int(x))
    return str(x) if isinstance(x, int) else f"{x:.6g}"


class Calculator:
    name = "calculator"

    def __init__(self, output_chars: int = 2048):
        self.output_chars = output_chars

    def __call__(self, expression: str) -> ToolResult:
        try:
            return ToolResult(True, truncate(format_number(evaluate(expression)), self.output_chars))
        except (ValueError, SyntaxError, ZeroDivisionError, OverflowError, TypeError) as e:
            return ToolResult(False, truncate(f"error: {type(e).__name__}: {e}", self.output_chars))


class PythonExecutor:
    """Runs code in a child process with limits (`rlhf_ray.envs.sandbox`); its output is the observation."""
    name = "python"

    def __init__(self, limits: Limits = Limits()):
        self.limits = limits

    def __call__(self, code: str) -> ToolResult:
        return run_python(code, self.limits)


class ToolActor:
    """Ray shell of one tool (wrapped with `ray.remote` by `build_tools`)."""

    def __init__(self, tool):
        self.tool = tool

    def call(self, text: str) -> ToolResult:
        return self.tool(text)


def make_tool(name: str, limits: Limits):
    """The plain tool `name` with the run's limits."""
    if name == "calculator":
        return Calculator(limits.output_bytes)
    if name == "python":
        return PythonExecutor(limits)
    raise ValueError(f"unknown tool {name!r}; tools: calculator, python")


def remote_call(actor, limits: Limits) -> Callable[[str], ToolResult]:
    """A call into a tool's actor that waits at most the tool's own limit plus a margin; a dead or stuck actor
    is an error observation, not a failed run."""
    import ray

    def call(text: str) -> ToolResult:
        try:
            return ray.get(actor.call.remote(text), timeout=limits.timeout_s + 10.0)
        except (ray.exceptions.RayError, TimeoutError) as e:
            return ToolResult(False, truncate(f"error: the tool failed: {type(e).__name__}", limits.output_bytes))
    return call


def build_tools(names: tuple[str, ...], limits: Limits, on_ray: bool) -> tuple[Tools, list]:
    """(name -> call, the actors to kill at the end). on_ray: each tool a Ray actor (restarted if it dies),
    else called in this process (the preflight's probe, before Ray starts)."""
    if not on_ray:
        return {n: make_tool(n, limits) for n in names}, []
    import ray
    remote = ray.remote(num_cpus=0, max_restarts=3)(ToolActor)
    actors = {n: remote.remote(make_tool(n, limits)) for n in names}
    return {n: remote_call(a, limits) for n, a in actors.items()}, list(actors.values())


def limits_of(env_cfg) -> Limits:
    """The tools' limits from the `env` config section."""
    return Limits(env_cfg.tool_timeout_s, env_cfg.tool_memory_mb, env_cfg.tool_output_bytes)

