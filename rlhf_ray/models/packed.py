"""Forwards without padding: several short sequences share one row.

An RL batch is prompts left-padded to the longest prompt and responses right-padded to the longest response,
so with ragged lengths much of a (B, P + T) batch is padding that every GEMM of the forward and the backward
computes (the tiny PPO task: 6-8-token prompts, 32-token cap, 18-token mean responses: 39% padding; its
response pass alone 44%). Packing puts the real tokens end to end into rows as wide as the longest
sequence (first fit, longest first), with each token's own position and a 4-D attention mask that keeps
every sequence to itself and causal. Per token the computation is the padded one (the same positions, the
same keys), so results agree with the padded forward up to float rounding; only the padding is gone. The
idea of verl's "remove padding" and OpenRLHF's sample packing, here with a mask that HF's eager and SDPA
attention take as they are, so no varlen kernel is needed and it runs on any device.

Two layouts:
    PackedRows       whole sequences (rows that share no prompt)
    PackedResponses  the response pass of `rlhf_ray.models.shared_prompt`: each packed row also sees the
                     cached keys of the prompts of its sequences (at most a few per row, so attention
                     stays about as cheap as the padded layout's)
    mask_dtype       the mask form a model's attention takes (None: one that takes no 4-D mask)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from rlhf_ray.batch import SequenceBatch

# The mask is (R, 1, W, keys): beyond this many elements (64 MiB in fp32) a batch keeps the padded forward.
MAX_MASK_ELEMENTS = 1 << 24
# Packing pays for its mask and its gathers only where it drops at least this share of the padded positions
# (a tiny-model reference pass with 2 of 32 rows saved ran 11% slower packed in bf16).
MIN_SAVING = 1 / 8


def mask_dtype(model: torch.nn.Module) -> Optional[torch.dtype]:
    """The packed mask's dtype for `model`'s attention: bool for SDPA (every SDPA kernel takes it, whatever the
    query's dtype: a 4-bit model's queries are fp32 beside a bf16 compute dtype), the model's float dtype for
    eager (it adds the mask to its scores; an fp32 score promotes a bf16 mask). None for any other
    implementation (flash attention takes no 4-D mask): such a model keeps the padded forward."""
    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    if impl == "eager":  # the model's own float dtype, as HF's eager mask: fp32 queries promote a bf16 mask
        return getattr(model, "dtype", torch.float32)
    return torch.bool if impl == "sdpa" else None


def first_fit(lengths: list[int], width: int, prompt: Optional[list[int]] = None,
              max_prompts: int = 0) -> tuple[list[tuple[int, int]], list[list[int]]]:
    """Sequences of `lengths` into rows of `width`, longest first, each into the first row with room: (row,
    first column) per sequence, and the prompts each row holds. With `prompt` (each sequence's prompt index),
    a row holds at most `max_prompts` distinct prompts, and a sequence goes to a row that holds its prompt
    already before any other."""
    free: list[int] = []
    prompts: list[list[int]] = []
    place = [(0, 0)] * len(lengths)
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        fits = [r for r, f in enumerate(free) if f >= lengths[i]]
        if prompt is not None:
            fits = ([r for r in fits if prompt[i] in prompts[r]]
                    or [r for r in fits if len(prompts[r]) < max_prompts])
        r = fits[0] if fits else len(free)
        if r == len(free):
            free.append(width)
            prompts.append([])
        place[i] = (r, width - free[r])
        free[r] -= lengths[i]
        if prompt is not None and prompt[i] not in prompts[r]:
            prompts[r].append(prompt[i])
    return place, prompts


def _own_mask(segment: torch.Tensor) -> torch.Tensor:
    """(R, W, W) bool: a token sees the tokens of its own sequence up to itself; an empty slot sees itself
    (no query without a key, so no NaN in a softmax; nothing reads its output)."""
    width = segment.shape[1]
    same = (segment[:, :, None] == segment[:, None, :]) & (segment[:, :, None] >= 0)
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    return (same & causal) | torch.eye(width, dtype=torch.bool)


def _as_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(R, Q, K) bool -> (R, 1, Q, K) in `dtype`: bool as is (SDPA), a float additive (eager)."""
    if dtype == torch.bool:
        return allowed[:, None]
    mask = torch.zeros(allowed.shape, dtype=dtype)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


def _gather(out: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """(R, W, ...) packed outputs at `where`'s flat indices; -1 (padding) takes the first packed position's
    value: finite, and every caller masks it."""
    flat = out.reshape(-1, *out.shape[2:])
    return flat[where.clamp(min=0).to(flat.device)]


def _scatter(values: torch.Tensor, dest: torch.Tensor, size: int, fill: int) -> torch.Tensor:
    out = torch.full((size,), fill, dtype=torch.long)
    out[dest] = values
    return out


@dataclass(frozen=True)
class PackedRows:
    input_ids: torch.Tensor     # (R, W) long: sequences end to end, 0 after the last
    position_ids: torch.Tensor  # (R, W) long: each token's position in its own sequence
    segment: torch.Tensor       # (R, W) long: the source row of each token, -1 where nothing is
    where: torch.Tensor         # (B, L) long: each padded position's index into the (R * W) flat rows, -1 on padding

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.input_ids.shape)

    def model_inputs(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "position_ids": self.position_ids,
                "attention_mask": _as_mask(_own_mask(self.segment), dtype)}

    def unpack(self, out: torch.Tensor, columns: Optional[slice] = None) -> torch.Tensor:
        """(R, W, ...) per-position outputs -> (B, L', ...) at the padded layout's `columns` (all by default)."""
        return _gather(out, self.where if columns is None else self.where[:, columns])


def pack_rows(seq: SequenceBatch) -> Optional[PackedRows]:
    """`seq`'s rows packed whole, or None when that would not save `MIN_SAVING` of the positions or the mask
    would be too large."""
    attn = seq.attention_mask.bool()
    lengths = attn.sum(1).tolist()
    width = max(max(lengths), 1)
    place, prompts = first_fit(lengths, width)
    rows = len(prompts)
    if rows * width > (1 - MIN_SAVING) * attn.numel() or rows * width * width > MAX_MASK_ELEMENTS:
        return None
    # a row's real tokens are contiguous (left-padded prompt, right-padded response): the k-th goes to
    # column first + k of its packed row
    start = torch.tensor([r * width + c for r, c in place])
    cols = torch.arange(attn.shape[1])
    where = torch.where(attn, start[:, None] + cols - attn.long().argmax(1)[:, None], -1)
    dest, size = where[attn], rows * width
    source = torch.arange(len(lengths))[:, None].expand_as(attn)[attn]
    return PackedRows(_scatter(seq.input_ids[attn], dest, size, 0).view(rows, width),
                      _scatter(seq.position_ids[attn], dest, size, 0).view(rows, width),
                      _scatter(source, dest, size, -1).view(rows, width), where)


@dataclass(frozen=True)
class PackedResponses:
    """The response pass packed: row i's segment is its prompt's last token and its response but the last
    token (t_i tokens, whose logits predict the t_i response tokens), and each packed row's keys are its
    prompts' cached keys (`slots`, k per row, each P - 1 long) followed by its own tokens."""
    input_ids: torch.Tensor     # (R, W)
    position_ids: torch.Tensor  # (R, W)
    segment: torch.Tensor       # (R, W) source row per token, -1 where nothing is
    slots: torch.Tensor         # (R, k) the prompt (index into the distinct prompts) in each cache slot
    slot_sees: torch.Tensor     # (R, W, k) whether a token's own prompt is the one in that slot
    where: torch.Tensor         # (B, T) flat index of the position that predicts response token t, -1 beyond

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.input_ids.shape)

    def cache(self, prompt_cache):
        """The packed rows' KV cache from the prompt pass's (G rows of P - 1): per row its k prompts' keys and
        values side by side (a differentiable gather, so the backward reaches the prompt pass)."""
        from transformers import DynamicCache
        out = DynamicCache()
        R, k = self.slots.shape
        for layer, (keys, values, *_) in enumerate(prompt_cache):
            def gather(x):  # (G, h, P-1, d) -> (R, h, k * (P-1), d)
                g = x[self.slots.flatten().to(x.device)].view(R, k, *x.shape[1:])
                return g.transpose(1, 2).reshape(R, x.shape[1], k * x.shape[2], x.shape[3])
            out.update(gather(keys), gather(values), layer)
        return out

    def attention_mask(self, prompt_real: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(R, 1, W, k * (P - 1) + W): a token sees the real tokens of its own prompt's slot and its own
        sequence up to itself. prompt_real: (G, P - 1) bool, the prompt pass's attention mask."""
        R, W, k = self.slot_sees.shape
        real = prompt_real[self.slots.flatten()].view(R, 1, k, -1)             # (R, 1, k, P-1)
        prefix = (self.slot_sees[..., None] & real).reshape(R, W, -1)           # (R, W, k * (P-1))
        return _as_mask(torch.cat([prefix, _own_mask(self.segment)], dim=2), dtype)

    def unpack(self, out: torch.Tensor) -> torch.Tensor:
        """(R, W, ...) -> (B, T, ...) per response token."""
        return _gather(out, self.where)


def pack_responses(seq: SequenceBatch, inverse: torch.Tensor, max_prompt_keys: int) -> Optional[PackedResponses]:
    """The response pass of `seq` (rows sharing prompts: `inverse`, each row's distinct prompt) packed, or
    None when that would not save `MIN_SAVING` of its positions or the mask would be too large. A packed row
    holds at most as many prompts as fit `max_prompt_keys` cached keys (the caller keeps attention near the
    padded layout's cost)."""
    p, T = seq.prompt_len - 1, seq.response_mask.shape[1]
    # row i's segment: columns p .. p + t_i - 1 (the last prompt token, then its response's first t_i - 1)
    lengths = seq.attention_mask[:, p + 1:].sum(1).clamp(min=1).tolist()
    width = max(lengths)
    prompt = inverse.tolist()
    place, prompts = first_fit(lengths, width, prompt, max(1, max_prompt_keys // max(p, 1)))
    rows, k = len(prompts), max(len(g) for g in prompts)
    if rows * width > (1 - MIN_SAVING) * len(lengths) * T or rows * width * (k * p + width) > MAX_MASK_ELEMENTS:
        return None
    start = torch.tensor([r * width + c for r, c in place])
    cols = torch.arange(T)
    inside = cols[None, :] < torch.tensor(lengths)[:, None]                 # (B, T): the segment's tokens
    where = torch.where(inside, start[:, None] + cols, -1)
    dest, size = where[inside], rows * width
    source = torch.arange(len(lengths))[:, None].expand(-1, T)[inside]
    segment = _scatter(source, dest, size, -1).view(rows, width)
    slots = torch.tensor([g + [g[0]] * (k - len(g)) for g in prompts])     # unused slots: masked out below
    row_prompt = torch.where(segment >= 0, inverse[segment.clamp(min=0)], -1)
    slot_sees = row_prompt[:, :, None] == slots[:, None, :]
    used = torch.arange(k)[None, :] < torch.tensor([len(g) for g in prompts])[:, None]  # (R, k)
    return PackedResponses(_scatter(seq.input_ids[:, p:p + T][inside], dest, size, 0).view(rows, width),
                           _scatter(seq.position_ids[:, p:p + T][inside], dest, size, 0).view(rows, width),
                           segment, slots, slot_sees & used[:, None, :], where)
