"""The built-in arithmetic task: word problems generated from a seed, the environment that scores them, and
demonstrations of the calculator's use for a warm start (SFT).

The numbers are large enough (2-3 digit products and sums) that a small model's mental arithmetic is often
wrong, and a calculator call makes it exact: the policy learns to write `<calc>expression</calc>`, reads the
result, and answers. The episode's reward is the exact answer (`rewards.exact_answer`) of the final turn.

Problems are split by their question alone (`is_demo`): demonstrations come only from one share of the problem
space and RL prompts (training and held-out evaluation alike) only from the rest, so no seed or row count makes
a demonstration repeat a problem the run is evaluated on.
"""
from __future__ import annotations

import random
import re
import zlib

from rlhf_ray.envs.base import Reply, Tools
from rlhf_ray.envs.tools import Calculator

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
DEMO_SHARE = 8  # one problem in 8 is kept for demonstrations, never an RL prompt


def is_demo(question: str) -> bool:
    """Whether a question belongs to the demonstrations' share (a stable hash: the same on every machine)."""
    return zlib.crc32(question.encode()) % DEMO_SHARE == 0


def _draw(rng: random.Random) -> tuple[str, str]:
    """(question, expression) of one random problem."""
    question, expression = rng.choice(_TEMPLATES)
    a, b = rng.randint(12, 99), rng.randint(12, 99)
    c = rng.randint(2, min(99, a * b - 1))
    values = dict(a=a, b=b, c=c)
    return question.format(**values), expression.format(**values)


def problem(rng: random.Random, demo: bool = False) -> dict:
    """One row from the RL share of problems (demo: from the demonstrations' share): the question (with the
    instructions), its expression and its answer."""
    question, expr = _draw(rng)
    while is_demo(question) != demo:
        question, expr = _draw(rng)
    answer = eval(expr, {"__builtins__": {}})  # noqa: S307 - our own template of integers and + - *
    # a plain prompt: a tokenizer with a chat template renders it as the user's turn, one without reads it as is
    return {"prompt": f"{INSTRUCTIONS}\n\n{question}", "answer": str(answer), "expression": expr}


def prompt_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [problem(rng) for _ in range(n)]


def call_text(expression: str) -> str:
    return f"<calc>{expression}</calc>"


def result_text(tool_output: str) -> str:
    """The calculator's reply as the policy reads it (the environment's observation, and the demonstrations')."""
    return f"<result>{tool_output}</result>"


def demonstration(row: dict) -> list[dict]:
    """A solved episode of `row` as two SFT rows in chat messages: the call, then the answer after the
    calculator's real reply. The reply sits in the second row's prompt, so SFT never trains on it, as RL masks
    it; rendered by the chat template, the second row's ids are the ids an RL episode feeds the engine (the
    engine's turn ends on EOS and `env.observation_template` is the template's user turn)."""
    user = {"role": "user", "content": row["prompt"]}
    call = {"role": "assistant", "content": call_text(row["expression"])}
    reply = {"role": "user", "content": result_text(Calculator()(row["expression"]).text)}
    return [{"messages": [user, call]},
            {"messages": [user, call, reply, {"role": "assistant", "content": row["answer"]}]}]


def demo_rows(n: int, seed: int) -> list[dict]:
    """n SFT rows (two per problem, see `demonstration`) from the demonstrations' share of problems, drawn
    with a stream of their own so they are not the RL prompts' neighbours in one sequence either."""
    rng = random.Random(f"arith-demos-{seed}")
    rows: list[dict] = []
    while len(rows) < n:
        rows += demonstration(problem(rng, demo=True))
    return rows[:n]


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
        return Reply("tool", result_text(result.text), tool_calls=1, tool_errors=int(not result.ok))

