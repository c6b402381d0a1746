"""The embedded default task: short movie reviews, and a reward for positive ones.

Everything here is generated from word lists with a seeded RNG, so the task needs no download and
builds in milliseconds. It gives the three datasets of the pipeline:
  - SFT rows (`prompt`, `response`): reviews of mixed sentiment, so the SFT policy writes both kinds;
  - preference pairs (`prompt`, `chosen`, `rejected`): two responses to one prompt, the one that the
    judge (VADER, a rule-based sentiment scorer) rates more positive is `chosen`; ties are dropped at
    build time (they carry no preference), never silently at train time;
  - RL prompts (`prompt`).
The RL reward is the trained reward model; `vader_reward` is the gold judge and a function reward.
"""
from __future__ import annotations

import random
from functools import lru_cache

TITLES = ("the red door", "moon harbor", "the last train", "paper kings", "quiet river", "iron garden",
          "the blue hour", "city of glass", "night shift", "the long road", "silver lake", "the fox")
SUBJECTS = ("the movie", "the film", "the plot", "the acting", "the ending", "the cast", "the story",
            "the music", "the script", "the pacing")
VERBS = ("was", "is", "felt", "seemed")
POSITIVE = ("great", "wonderful", "brilliant", "excellent", "fantastic", "lovely", "superb", "amazing",
            "beautiful", "delightful", "good", "fun")
NEGATIVE = ("terrible", "awful", "boring", "dull", "horrible", "bad", "weak", "poor", "lame", "dreadful",
            "ugly", "sad")
CLOSERS_POS = ("i loved it .", "i enjoyed it .", "highly recommended .", "a joy to watch .")
CLOSERS_NEG = ("i hated it .", "avoid it .", "a waste of time .", "not worth it .")
PROMPT_FORMS = ("review of {t} :", "my review of {t} :", "what i think of {t} :")


def make_prompt(rng: random.Random) -> str:
    return rng.choice(PROMPT_FORMS).format(t=rng.choice(TITLES))


def make_review(rng: random.Random, positivity: float) -> str:
    """A review of two or three clauses; each clause is positive with probability `positivity`."""
    parts = []
    for _ in range(rng.choice((2, 3))):
        pos = rng.random() < positivity
        adj = rng.choice(POSITIVE if pos else NEGATIVE)
        parts.append(f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {adj} .")
    pos = rng.random() < positivity
    parts.append(rng.choice(CLOSERS_POS if pos else CLOSERS_NEG))
    return " ".join(parts)


def sft_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": make_prompt(rng), "response": " " + make_review(rng, rng.choice((0.1, 0.5, 0.9)))}
            for _ in range(n)]


def preference_rows(n: int, seed: int = 1) -> list[dict]:
    rng = random.Random(seed)
    rows: list[dict] = []
    while len(rows) < n:
        prompt = make_prompt(rng)
        a, b = (" " + make_review(rng, rng.random()) for _ in range(2))
        sa, sb = vader_score(a), vader_score(b)
        if sa == sb:
            continue
        chosen, rejected = (a, b) if sa > sb else (b, a)
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def prompt_rows(n: int, seed: int = 2) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": make_prompt(rng)} for _ in range(n)]


def corpus() -> list[str]:
    """Text the built-in tokenizer is trained on: every word the task can produce, in context."""
    rows = sft_rows(400, seed=123)
    words = " ".join(TITLES + SUBJECTS + VERBS + POSITIVE + NEGATIVE + CLOSERS_POS + CLOSERS_NEG)
    return [r["prompt"] + r["response"] for r in rows] + [words] * 4


@lru_cache(maxsize=1)
def _vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    return SentimentIntensityAnalyzer()


def vader_score(text: str) -> float:
    """VADER compound score in [-1, 1] (Hutto & Gilbert 2014)."""
    return float(_vader().polarity_scores(text)["compound"])


def vader_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """A function reward (`rlhf_ray.data.builtin_reviews:vader_reward`): positivity of the response."""
    return [vader_score(r) for r in responses]
