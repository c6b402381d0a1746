"""The built-in arithmetic task: word problems generated from a seed, and the environment that scores them.

The numbers are large enough (2-3 digit products and sums) that a small model's mental arithmetic is often
wrong, and a calculator call makes it exact: the policy learns to write `<calc>expression</calc>`, reads the
result, and answers. The episode's reward is the exact answer (`rewards.exact_answer`) of the final turn.
"""
from __future__ import annotations

import random
import re

from rlhf_ray.envs.base import Reply, Tools

# One example of the call in the instructions: a small model that has never seen the format otherwise almost
# never writes it (SmolLM2-135M: no call in 64 samples at step 0 without it), and GRPO cannot reinforce a
# behaviour it never samples.
INSTRUCTIONS = ("Use the calculator. To compute, reply with only <calc>expression</calc>, for example "
                "<calc>12 * 34 - 5</calc>. After the result, reply with only the final number.")

# (question, expression) templates; {a} {b} {c} are drawn per row
_TEMPLATES = (
    ("A shop sells {a} boxes with {b} pencils each. How many pencils is that?", "{a} * {b}"),
    ("Sam has {a} coins and finds {b} bags of {c} coins each. How many coins does Sam have now?", "{a} + {b} * {c}"),
    ("A train carries {a} people on each of {b} trips, and {c} people get off for good. How many people "
     "were carried and stayed?", "{a} * {b} - {c}"),
    ("There are {a} rows of {b} chairs. {c} chairs are broken. How many chairs can be used?", "{a} * {b} - {c}"),
    ("A farmer picks {a} apples a day for {b} days and sells {c}. How many apples are left?", "{a} * {b} - {c}"),
)
_CALL = re.compile(r"<calc>(.*?)(?:</calc>|$)", re.S)


def problem(rng: random.Random) -> dict:
    """One row: the question (with the instructions) and its answer."""
    question, expression = rng.choice(_TEMPLATES)
    a, b = rng.randint(12, 99), rng.randint(12, 99)
    c = rng.randint(2, min(99, a * b - 1))
    values = dict(a=a, b=b, c=c)
    expr = expression.format(**values)
    answer = eval(expr, {"__builtins__": {}})  # noqa: S307 - our own template of integers and + - *
    # a plain prompt: a tokenizer with a chat template renders it as the user's turn, one without reads it as is
    return {"prompt": f"{INSTRUCTIONS}\n\n{question.format(**values)}",
            "answer": str(answer), "expression": expr}


def prompt_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [problem(rng) for _ in range(n)]


class ArithEnv:
    """A turn with `<calc>...</calc>` is a calculator call (answered with its result, if the run has the tool);
    any other turn is the final answer: done, reward 1.0 when its last number is the answer."""

    def __init__(self, tools: Tools):
        self.calculator = tools.get("calculator")
        self.answer = ""

    def reset(self, row: dict) -> None:
        if "answer" not in row:
            raise ValueError("an arithmetic row needs an 'answer' column")
        self.answer = str(row["answer"])

    def step(self, turn: str) -> Reply:
        from rlhf_ray.envs.rewards import exact_answer
        call = _CALL.search(turn)
        if call is None or self.calculator is None:
            return Reply("done", reward=exact_answer(turn, self.answer))
        result = self.calculator(call.group(1))
        return Reply("tool", f"<result>{result.text}</result>", tool_calls=1, tool_errors=int(not result.ok))

