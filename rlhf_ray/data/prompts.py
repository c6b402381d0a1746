"""RL prompts: read, templated, tokenised and length-checked once, before any actor starts.

A source is a built-in (`builtin:reviews`, `builtin:movie-reviews`) or a file of rows with a `prompt`
column (text) or a `messages` column (chat). With a chat template the prompt becomes the template's
user turn plus the generation prompt; without one it is the text as is. Prompts longer than
`data.max_prompt_len` tokens follow `data.on_long_prompt`: error (naming the row), truncate_left (keep
the end, which holds the question and the generation prompt), or skip (counted and reported).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from rlhf_ray.config import DataConfig
from rlhf_ray.errors import RunError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prompt:
    text: str            # what the reward sees as the prompt
    ids: tuple[int, ...]  # what the generator is given


class PromptError(RunError, ValueError):
    """A prompt row is unusable; the message names the source and the row."""


def prompt_rows(source: str, data_cfg: DataConfig) -> list[dict]:
    if source == "builtin:reviews":
        from rlhf_ray.data.builtin_reviews import prompt_rows as reviews
        return reviews(data_cfg.num_samples)
    if source.startswith("builtin:"):
        from rlhf_ray.data import builtin
        return builtin.rows(source, "prompts", data_cfg)
    from rlhf_ray.data.files import read_rows
    return read_rows(source)


def load_prompts(data_cfg: DataConfig, tokenizer) -> list[Prompt]:
    out: list[Prompt] = []
    skipped = truncated = 0
    limit = data_cfg.max_prompt_len
    for i, row in enumerate(prompt_rows(data_cfg.prompts, data_cfg)):
        text = _prompt_text(row, i, data_cfg, tokenizer)
        if text is None:
            skipped += 1
            continue
        ids = _encode(text, tokenizer)
        if len(ids) > limit:
            if data_cfg.on_long_prompt == "error":
                raise PromptError(f"{data_cfg.prompts} row {i}: prompt has {len(ids)} tokens, more than "
                                  f"data.max_prompt_len={limit} (set data.on_long_prompt=truncate_left or skip)")
            if data_cfg.on_long_prompt == "skip":
                skipped += 1
                continue
            ids, truncated = ids[-limit:], truncated + 1
        out.append(Prompt(row.get("prompt") or text, tuple(ids)))
    if skipped or truncated:
        log.warning("prompts from %s: %d skipped, %d truncated to %d tokens", data_cfg.prompts, skipped,
                    truncated, limit)
    if not out:
        raise PromptError(f"no usable prompts in {data_cfg.prompts} ({skipped} skipped)")
    return out


def _prompt_text(row: dict, i: int, data_cfg: DataConfig, tokenizer) -> str | None:
    if isinstance(row.get("prompt"), str) and row["prompt"].strip():
        messages = [{"role": "user", "content": row["prompt"]}]
    elif isinstance(row.get("messages"), list) and row["messages"]:
        messages = row["messages"]
    else:
        if data_cfg.on_bad_row == "skip":
            return None
        raise PromptError(f"{data_cfg.prompts} row {i}: needs a non-empty 'prompt' string or 'messages' list, "
                          f"got keys {sorted(row)} (set data.on_bad_row=skip to skip such rows)")
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "\n".join(m["content"] for m in messages)


def _encode(text: str, tokenizer) -> list[int]:
    # Chat templates already carry the BOS text; a plain prompt gets the tokenizer's usual specials.
    specials = not getattr(tokenizer, "chat_template", None)
    return tokenizer(text, add_special_tokens=specials).input_ids
