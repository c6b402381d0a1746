"""The reward scorer: a weighted sum of reward sources, each scoring (prompt text, response text) pairs.

Sources work on text, not token ids, so a reward model with its own tokenizer re-tokenises what the
policy wrote (the policy's and the reward model's vocabularies may differ).
  model     a HF sequence-classification folder (1 label), e.g. the output of `rlhf-ray rm`
  function  `module:function(prompts: list[str], responses: list[str]) -> list[float]` (verifiable rewards)
  http      POST {"prompts": [...], "responses": [...]} -> {"scores": [...]}, with timeout and retries
"""
from __future__ import annotations

import importlib
import time
from typing import Callable, Protocol, Sequence

import ray
import torch

from rlhf_ray.batch import SequenceBatch
from rlhf_ray.config import RewardConfig, RewardSource
from rlhf_ray.errors import RunError, user_traceback
from rlhf_ray.models import packed
from rlhf_ray.utils.device import attention_kwargs, on_device


class RewardSourceError(RunError, RuntimeError):
    """A reward source failed or answered something unusable; the message names the source."""

    role = "reward"


class Source(Protocol):
    name: str

    def __call__(self, prompts: Sequence[str], responses: Sequence[str], team=None,
                 finished: Sequence[bool] | None = None) -> list[float]:
        """team: a `rlhf_ray.utils.phases.CoreTeam` a model's forward may split its rows over; a function or a
        service always sees the whole batch. finished: per row, False where the generator cut the response at
        its token limit (None: every response is whole); a model reads such a response without its close."""


class ModelSource:
    """A trained reward model. Inputs are encoded exactly as in reward-model training
    (`rlhf_ray.data.encode`: template, EOS), and the score is read at each row's last real token. A response cut
    at the generation limit is read as written, without EOS: scored as a finished one, rambling to the limit
    would cost nothing (tiny PPO task: policies stuck at the limit for the rest of a run, `ppo_vs_trl.py`)."""

    def __init__(self, path: str, batch_size: int = 64, device: str = "cpu", dtype=torch.float32,
                 max_tokens: int | None = None):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        self.name = f"model:{path}"
        self.tok = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype,
                                                                        **attention_kwargs(device, dtype))
        self.model.to(device).eval()
        if self.model.config.num_labels != 1:
            raise RewardSourceError(f"{self.name}: a reward model must have 1 output label, "
                                    f"it has {self.model.config.num_labels}")
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        self.batch_size, self.device = batch_size, device
        self.max_tokens = max_tokens  # reward.max_tokens_per_micro_batch; None: batch_size rows at a time
        # decoder models read rows packed without their padding (`rlhf_ray.models.packed`); None: padded
        self.pack_dtype = packed.mask_dtype(self.model) if getattr(self.model, "score", None) is not None else None

    def _encode(self, prompt: str, response: str, finished: bool) -> list[int]:
        from rlhf_ray.data.encode import prompt_ids, response_ids
        p = prompt_ids(self.tok, prompt)
        return p + response_ids(self.tok, prompt, p, response, finished)

    @torch.no_grad()
    def __call__(self, prompts, responses, team=None, finished=None):
        from rlhf_ray.data.encode import pad
        from rlhf_ray.dispatch import balanced_cut, dealt
        finished = [True] * len(prompts) if finished is None else finished
        rows = [self._encode(p, r, f) for p, r, f in zip(prompts, responses, finished)]

        def scores(part: list[int]) -> list[float]:
            ids, mask = pad([rows[i] for i in part], self.tok.pad_token_id)
            return self._scores(ids, mask).float().tolist()
        out = [0.0] * len(rows)
        for part in self._micro_batches(rows):  # each one's rows split over the team, computed at once
            pieces = [part]
            if team is not None:  # longest first: dealt when packed, else cut to about equal padded sizes
                part = sorted(part, key=lambda i: -len(rows[i]))
                cut = (dealt(len(part), team.size) if self.pack_dtype is not None
                       else balanced_cut([(1, 0, len(rows[i])) for i in part], team.size))
                pieces = [[part[j] for j in c] for c in cut]
            for piece, vals in zip(pieces, team.map(scores, pieces) if team is not None else map(scores, pieces)):
                for i, v in zip(piece, vals):
                    out[i] = v
        return out

    def _micro_batches(self, rows: list[list[int]]) -> list[list[int]]:
        """Row indices per forward: `batch_size` rows in order, or rows packed longest first while rows x
        longest row stays within `max_tokens` (each row is its own run: the reward model shares no prompts)."""
        if self.max_tokens is None:
            return [list(range(i, min(i + self.batch_size, len(rows)))) for i in range(0, len(rows), self.batch_size)]
        from rlhf_ray.dispatch import pack_by_tokens
        lengths = torch.tensor([len(r) for r in rows])
        runs = [torch.tensor([i]) for i in range(len(rows))]
        return [idx.tolist() for idx in pack_by_tokens(runs, torch.zeros_like(lengths), lengths, self.max_tokens)]

    def _scores(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B,) scores of right-padded (B, L) rows (on the host), each read at its last real token: the rows
        packed without their padding where the model's attention takes a packed mask and that saves positions."""
        head = getattr(self.model, "score", None)
        if head is None:  # encoder models (e.g. MiniLM) pool on their own
            return self.model(**on_device({"input_ids": ids, "attention_mask": mask}, self.device)).logits[:, 0]
        # Decoder reward models: HF pools at the last non-pad *id*, wrong when pad == EOS; pool by the mask.
        last = mask.shape[1] - 1 - mask.flip(-1).long().argmax(-1)
        inputs, at = {"input_ids": ids, "attention_mask": mask}, torch.arange(len(ids)) * ids.shape[1] + last
        if self.pack_dtype is not None:
            positions = (mask.cumsum(1) - 1).clamp(min=0)
            rows = packed.pack_rows(SequenceBatch(ids, mask, positions, mask.float(), 0))
            if rows is not None:  # each row's last real token, in the packed rows
                inputs, at = rows.model_inputs(self.pack_dtype), rows.where[torch.arange(len(ids)), last]
        hidden = self.model.base_model(**on_device(inputs, self.device)).last_hidden_state.flatten(0, 1)
        return head(hidden[at.to(hidden.device)])[:, 0]


class FunctionSource:
    def __init__(self, spec: str):
        self.name = f"function:{spec}"
        module, _, attr = spec.partition(":")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise RewardSourceError(f"reward function {spec!r} cannot be imported: {e}") from None
        if not callable(fn):
            raise RewardSourceError(f"reward function {spec!r} is not callable")
        self.fn: Callable = fn

    def __call__(self, prompts, responses, team=None, finished=None):
        try:
            out = self.fn(list(prompts), list(responses))
        except Exception as e:  # noqa: BLE001 - the user's code: name the source, show their frames
            raise RewardSourceError(f"reward {self.name} raised {type(e).__name__}: {e}",
                                    detail=user_traceback(e)) from None
        return as_scores(self.name, out, len(prompts))


def as_scores(name: str, out, n: int) -> list[float]:
    """A source's answer as n floats, or a `RewardSourceError` naming what it returned instead."""
    try:
        vals = list(out)
    except TypeError:
        raise RewardSourceError(f"reward {name} returned {type(out).__name__}, not a list of numbers") from None
    bad = [(i, v) for i, v in enumerate(vals) if isinstance(v, (str, bytes)) or not _is_number(v)]
    if bad:
        i, v = bad[0]
        raise RewardSourceError(f"reward {name} returned {type(v).__name__} {v!r} at row {i} "
                                f"({len(bad)} of {len(vals)} rows are not numbers)")
    if len(vals) != n:
        raise RewardSourceError(f"reward {name} returned {len(vals)} scores for {n} responses")
    return [float(v) for v in vals]


def _is_number(v) -> bool:
    try:
        float(v)
    except (TypeError, ValueError):
        return False
    return not isinstance(v, (str, bytes))


class HttpSource:
    def __init__(self, url: str, timeout_s: float, retries: int):
        import httpx
        self.name, self.url, self.retries = f"http:{url}", url, retries
        self.client = httpx.Client(timeout=timeout_s)

    def __call__(self, prompts, responses, team=None, finished=None):
        import httpx
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            try:
                r = self.client.post(self.url, json={"prompts": list(prompts), "responses": list(responses)})
                r.raise_for_status()
                scores = r.json()["scores"]
                return as_scores(self.name, scores, len(prompts))
            except (httpx.HTTPError, KeyError, ValueError, TypeError) as e:
                last = e
                if attempt < self.retries:
                    time.sleep(min(2.0 ** attempt * 0.25, 4.0))
        raise RewardSourceError(f"reward service {self.url} failed after {self.retries + 1} attempts: "
                                f"{type(last).__name__}: {last}")


def build_source(src: RewardSource, resolve_path: Callable[[str], str] = lambda p: p, device: str = "cpu",
                 dtype=torch.float32, batch_size: int = 64, max_tokens: int | None = None) -> Source:
    if src.kind == "model":
        return ModelSource(resolve_path(src.path), batch_size=batch_size, device=device, dtype=dtype,
                           max_tokens=max_tokens)
    if src.kind == "function":
        return FunctionSource(src.path)
    return HttpSource(src.url, src.timeout_s, src.retries)


class RewardScorer:
    """Plain class behind the reward actor: `score(prompts, responses) -> (scores (B,), per-source stats)`."""

    def __init__(self, cfg: RewardConfig, resolve_path: Callable[[str], str] = lambda p: p, device: str = "cpu",
                 dtype=torch.float32, batch_size: int = 64):
        """device, dtype, batch_size: a reward model's (in RL runs the plan's: its GPU, bf16 there, and a
        micro-batch whose logits fit the budget)."""
        self.cfg = cfg
        self.sources = [(build_source(s, resolve_path, device, dtype, batch_size, cfg.max_tokens_per_micro_batch),
                         s.weight) for s in cfg.sources]

    def score(self, prompts: Sequence[str], responses: Sequence[str], team=None,
              finished: Sequence[bool] | None = None) -> tuple[list[float], dict[str, float]]:
        """team: a `rlhf_ray.utils.phases.CoreTeam` the reward models' forwards split their rows over.
        finished: per row, False for a response cut at the generation limit (None: all whole; `Source`)."""
        if len(prompts) != len(responses) or (finished is not None and len(finished) != len(prompts)):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses"
                             + ("" if finished is None else f" and {len(finished)} finish flags"))
        total = torch.zeros(len(prompts), dtype=torch.float64)
        stats: dict[str, float] = {}
        for i, (source, weight) in enumerate(self.sources):
            vals = source(prompts, responses, team, finished)
            if len(vals) != len(prompts):
                raise RewardSourceError(f"{source.name} returned {len(vals)} scores for {len(prompts)} responses")
            t = torch.tensor(vals, dtype=torch.float64)
            finite = t[torch.isfinite(t)]
            stats[f"reward/source{i}_mean"] = float(finite.mean()) if len(finite) else float("nan")
            total += weight * t
        return total.tolist(), stats


@ray.remote
class RewardActor:
    """Ray shell of `RewardScorer` (distributed placement)."""

    def __init__(self, *args, **kwargs):
        self.s = RewardScorer(*args, **kwargs)

    def score(self, prompts, responses, threads: int = 0, finished=None):
        from rlhf_ray.utils.phases import set_phase_threads, timed
        set_phase_threads(threads)
        return timed(self.s.score, prompts, responses, None, finished)
