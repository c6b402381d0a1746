"""Rows -> token ids, with explicit truncation rules, and padded batches.

Text layout:
  with a chat template:  prompt = template(user turn(s), add_generation_prompt=True),
                         full   = template(prompt turns + assistant turn); response = full minus prompt
  without one:           prompt = tokenizer(prompt) (its special tokens, e.g. BOS, as the generator sees it),
                         response = tokenizer(response, no special tokens) + EOS
Truncation (the same for SFT and both sides of a preference pair):
  1. a prompt longer than `max_prompt_len` follows `on_long_prompt`: "error", "truncate_left" (keep its
     last tokens, nearest the response) or "skip" (dropped and counted);
  2. the response is cut on the right to fit `max_seq_len` (its EOS is then lost, and the row is counted
     as `responses_truncated`);
  3. a preference pair whose two truncated responses became identical carries no preference: skipped
     and counted as `pairs_identical`.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from rlhf_ray.data.readers import DataError


@dataclass(frozen=True)
class Limits:
    max_prompt_len: int
    max_seq_len: int
    on_long_prompt: str  # "error" | "truncate_left" | "skip"


class _Skip(Exception):
    pass


def _as_messages(prompt) -> list[dict]:
    return prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]


def prompt_ids(tok, prompt) -> list[int]:
    if tok.chat_template:
        return list(tok.apply_chat_template(_as_messages(prompt), add_generation_prompt=True, tokenize=True,
                                            return_dict=False))
    if isinstance(prompt, list):
        raise DataError("a chat-message row needs a tokenizer with a chat template")
    return tok(prompt)["input_ids"]


def response_ids(tok, prompt, p_ids: list[int], response: str, finished: bool = True) -> list[int]:
    """The response's ids after the prompt's `p_ids`: closed as the template closes an assistant turn, or by EOS.
    finished=False: a response the generator cut at its token limit, read as written, without the close
    (as a response cut at max_seq_len loses its EOS in training, rule 2 above), so that a reward model does not
    score an unfinished response as a finished one. An encoder's separator stays: it is the pair's layout."""
    if not finished and (tok.chat_template or tok.eos_token_id is not None):
        return tok(response, add_special_tokens=False)["input_ids"]
    if tok.chat_template:
        full = list(tok.apply_chat_template(_as_messages(prompt) + [{"role": "assistant", "content": response}],
                                            tokenize=True, return_dict=False))
        if full[:len(p_ids)] != p_ids:
            raise DataError("the chat template does not render the prompt as a prefix of the conversation")
        return full[len(p_ids):]
    # An encoder's tokenizer (BERT-style reward models such as MiniLM) has no EOS: end on its separator,
    # as its own sentence-pair encoding does ([CLS] prompt [SEP] response [SEP]).
    end = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
    if end is None:
        raise DataError(f"tokenizer {tok.name_or_path!r} has neither an EOS nor a separator token to end a response")
    return tok(response, add_special_tokens=False)["input_ids"] + [end]


def decode_responses(tok, response_ids: list[list[int]]) -> list[str]:
    """Responses' text as vLLM's own detokenizer gives it: special tokens skipped, and a character whose bytes
    the response did not finish left out (vLLM holds such a tail back instead of writing U+FFFD). The engine's
    texts when nothing stops on a string, and a partial rollout's whole text (`rlhf_ray.rl.producer`)."""
    return [t.rstrip("\ufffd") for t in tok.batch_decode(response_ids, skip_special_tokens=True)]


def fit_prompt(ids: list[int], max_len: int, on_long: str) -> Optional[list[int]]:
    """The one rule for a prompt longer than `data.max_prompt_len` (SFT, preference pairs and RL prompts alike),
    per `data.on_long_prompt`: "error" raises DataError, "skip" returns None, "truncate_left" keeps its last
    `max_len` tokens (nearest the response: the question and the generation prompt)."""
    if len(ids) <= max_len:
        return ids
    if on_long == "error":
        raise DataError(f"prompt has {len(ids)} tokens, more than data.max_prompt_len={max_len} "
                        f"(set data.on_long_prompt=truncate_left or skip)")
    return None if on_long == "skip" else ids[-max_len:]


def _fit_prompt(ids: list[int], lim: Limits, counts: Counter) -> list[int]:
    fit = fit_prompt(ids, lim.max_prompt_len, lim.on_long_prompt)
    if fit is None:
        counts["prompts_too_long"] += 1
        raise _Skip
    if len(fit) < len(ids):
        counts["prompts_truncated"] += 1
    return fit


def _fit_response(p: list[int], r: list[int], lim: Limits, counts: Counter) -> list[int]:
    room = lim.max_seq_len - len(p)
    if room < 1:
        raise DataError(f"data.max_seq_len={lim.max_seq_len} leaves no room for a response after a "
                        f"{len(p)}-token prompt; raise max_seq_len above max_prompt_len")
    if len(r) > room:
        counts["responses_truncated"] += 1
        return r[:room]
    return r


def _encode_rows(rows: list[dict], example: Callable[[dict, Counter], Optional[dict]]) -> tuple[list[dict], Counter]:
    """`example(row, counts)` of each row (None: dropped); a row over the limits is skipped (its reason counted),
    a row that cannot be encoded is named in the error."""
    out, counts = [], Counter()
    for i, row in enumerate(rows):
        try:
            ex = example(row, counts)
        except _Skip:
            continue
        except DataError as e:
            raise DataError(f"{row.get('_where', f'row {i}')}: {e}") from None
        if ex is not None:
            out.append(ex)
    return out, counts


def encode_sft(rows: list[dict], tok, lim: Limits) -> tuple[list[dict], Counter]:
    """-> examples {input_ids, loss_mask} (loss on response tokens only)."""
    def example(row: dict, counts: Counter) -> dict:
        full_p = prompt_ids(tok, row["prompt"])
        p = _fit_prompt(full_p, lim, counts)
        r = _fit_response(p, response_ids(tok, row["prompt"], full_p, row["response"]), lim, counts)
        return {"input_ids": p + r, "loss_mask": [0] * len(p) + [1] * len(r)}
    return _encode_rows(rows, example)


def encode_preferences(rows: list[dict], tok, lim: Limits) -> tuple[list[dict], Counter]:
    """-> examples {chosen_ids, rejected_ids} (prompt + response each), prompt_len (the shared prompt's tokens)."""
    def example(row: dict, counts: Counter) -> Optional[dict]:
        full_p = prompt_ids(tok, row["prompt"])
        p = _fit_prompt(full_p, lim, counts)
        c = _fit_response(p, response_ids(tok, row["prompt"], full_p, row["chosen"]), lim, counts)
        r = _fit_response(p, response_ids(tok, row["prompt"], full_p, row["rejected"]), lim, counts)
        if c == r:
            counts["pairs_identical"] += 1
            return None
        return {"chosen_ids": p + c, "rejected_ids": p + r, "prompt_len": len(p)}
    return _encode_rows(rows, example)


def pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad -> (B, L) ids and (B, L) attention mask."""
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    return ids, mask


def collate_sft(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    ids, mask = pad([e["input_ids"] for e in examples], pad_id)
    loss_mask, _ = pad([e["loss_mask"] for e in examples], 0)
    return {"input_ids": ids, "attention_mask": mask, "loss_mask": loss_mask}


def collate_preferences(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen rows first, then rejected rows, padded to one length: one forward pass scores both."""
    ids, mask = pad([e["chosen_ids"] for e in examples] + [e["rejected_ids"] for e in examples], pad_id)
    b = len(examples)
    return {"chosen_ids": ids[:b], "chosen_mask": mask[:b], "rejected_ids": ids[b:], "rejected_mask": mask[b:],
            "prompt_len": torch.tensor([e["prompt_len"] for e in examples])}  # (B,)
