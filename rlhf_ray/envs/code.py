"""The built-in code task: write a small function; its tests, run in the sandbox, decide the reward. A failing
attempt is answered with the test output (cut to the tool's limit), so the policy may fix it in its next turn."""
from __future__ import annotations

import random

from rlhf_ray.envs.base import Reply, Tools

_TASKS = (
    ("add", "Write a Python function add(a, b) that returns the sum of a and b.",
     "assert add({x}, {y}) == {x} + {y}\nassert add(-{y}, {x}) == -{y} + {x}"),
    ("scale", "Write a Python function scale(xs, k) that returns a list with every element of xs times k.",
     "assert scale([{x}, {y}], {x}) == [{x} * {x}, {y} * {x}]\nassert scale([], 3) == []"),
    ("largest", "Write a Python function largest(xs) that returns the largest number in the list xs.",
     "assert largest([{x}, {y}, -1]) == max({x}, {y})\nassert largest([-{x}]) == -{x}"),
)


def prompt_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        name, text, tests = rng.choice(_TASKS)
        x, y = rng.randint(1, 50), rng.randint(1, 50)
        rows.append({"prompt": text + " Reply with a ```python code block.",
                     "tests": tests.format(x=x, y=y), "function": name})
    return rows


class CodeEnv:
    def __init__(self, tools: Tools):
        if "python" not in tools:
            raise ValueError("the code environment needs the python tool (env.tools: [python])")
        self.python = tools["python"]
        self.tests = ""

    def reset(self, row: dict) -> None:
        if "tests" not in row:
            raise ValueError("a code row needs a 'tests' column")
        self.tests = str(row["tests"])

    def step(self, turn: str) -> Reply:
        from rlhf_ray.envs.rewards import code_block, tests_pass
        reward, result = tests_pass(code_block(turn), self.tests, self.python)
        if reward == 1.0:
            return Reply("done", reward=1.0, tool_calls=1)
        return Reply("tool", f"The tests failed:\n{result.text}", tool_calls=1, tool_errors=1)
