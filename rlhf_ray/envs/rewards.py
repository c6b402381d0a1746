"""Verifiable rewards: checked against a known answer or by running tests, never judged by a model."""
from __future__ import annotations

import re
from fractions import Fraction
from typing import Callable, Optional

from rlhf_ray.envs.base import ToolResult

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def last_number(text: str) -> Optional[Fraction]:
    """The last number written in `text` (thousands separators allowed), exactly; None if there is none."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        return Fraction(found[-1].replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None


def exact_answer(text: str, answer: str | int | float) -> float:
    """1.0 when the last number of `text` equals `answer` exactly (as numbers: "84.0" is 84), else 0.0."""
    got = last_number(text)
    return float(got is not None and got == Fraction(str(answer)))


def tests_pass(code: str, tests: str, run: Callable[[str], ToolResult]) -> tuple[float, ToolResult]:
    """(1.0 when `code` followed by `tests` (asserts) runs to the end without error, else 0.0; the run's result).
    `run` is the sandboxed executor (`rlhf_ray.envs.tools.PythonExecutor` or its actor)."""
    result = run(code + "\n\n" + tests + "\n")
    return float(result.ok), result


def code_block(text: str) -> str:
    """The policy's code: the last ```python fenced block, else the whole turn."""
    blocks = re.findall(r"```(?:python|py)?\s*\n(.*?)```", text, flags=re.S)
    return blocks[-1] if blocks else text
