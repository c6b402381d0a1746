"""RL prompts: read, encoded and length-checked once, before any actor starts.

Rows come from `data.sources.load_rows(kind="prompts")` (built-ins, JSONL, parquet, `datasets` folders;
a `prompt` string or chat `messages`), and are encoded by `data.encode.prompt_ids`, the same function the
SFT and reward-model stages use, so the policy sees its prompts exactly as it was fine-tuned on them.
Prompts longer than `data.max_prompt_len` tokens follow `data.on_long_prompt`: error (naming the row),
truncate_left (keep the end, which holds the question and the generation prompt), or skip (counted).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from rlhf_ray.config import DataConfig
from rlhf_ray.errors import RunError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prompt:
    text: str             # what reward sources see as the prompt (the last user turn of a chat)
    ids: tuple[int, ...]  # what the generator is given
    # the dataset row an environment starts an episode from: `prompt` and the row's other columns
    row: dict = field(default_factory=dict, compare=False, hash=False)


class PromptError(RunError, ValueError):
    """A prompt row is unusable; the message names the source and the row."""


def load_prompts(data_cfg: DataConfig, tokenizer, seed: int = 0) -> list[Prompt]:
    from rlhf_ray.data.encode import fit_prompt, prompt_ids
    from rlhf_ray.data.readers import DataError
    from rlhf_ray.data.sources import load_rows

    rows, read = load_rows(data_cfg.prompts, "prompts", data_cfg, seed)
    out: list[Prompt] = []
    skipped, truncated, limit = read.skipped, 0, data_cfg.max_prompt_len
    for row in rows:
        full = prompt_ids(tokenizer, row["prompt"])
        try:
            ids = fit_prompt(full, limit, data_cfg.on_long_prompt)
        except DataError as e:
            raise PromptError(f"{row['_where']}: {e}") from None
        if ids is None:
            skipped += 1
            continue
        truncated += len(ids) < len(full)
        out.append(Prompt(_text(row["prompt"]), tuple(ids), {**row.get("columns", {}), "prompt": row["prompt"]}))
    if skipped or truncated:
        log.warning("prompts from %s: %d skipped, %d truncated to %d tokens", data_cfg.prompts, skipped,
                    truncated, limit)
    if not out:
        raise PromptError(f"no usable prompts in {data_cfg.prompts} ({skipped} skipped)")
    return out


def _text(prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if m.get("role") == "user"]
    return users[-1] if users else prompt[-1]["content"]
