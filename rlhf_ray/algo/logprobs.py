"""Per-token log-probabilities and entropy from logits, without materialising a full log-softmax.

``log_softmax(z)[y] = z[y] - logsumexp(z)``: gathering one logit per position and subtracting the
log-partition needs no (B, T, V) output tensor. The (rows, V) temporaries (the fp32 upcast, the
temperature scaling, logsumexp's workspace) live one small chunk of rows at a time, and the backward is
written by hand (`_TokenLogprobs`): it saves the logits as they came (bf16 stays bf16) and each row's
log-partition, recomputes the softmax chunk by chunk and writes the gradient straight into one tensor of
the logits' dtype. Autograd through chunked views instead keeps an fp32 copy of every chunk and zero-fills
a full-size gradient per chunk (SliceBackward): on SmolLM2's 1,536 x 49,152 logits that was 2.3 of a 5 s
bf16 update on a 2-core CPU, mostly page faults on those fresh 300 MB tensors.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# Elements per chunk (4 MiB of fp32): a chunk's temporaries stay in the CPU's last-level cache and below
# glibc's mmap threshold, so they are reused, not page-faulted in anew; Python's per-chunk cost (a few
# ops, ~50 us) is still small beside a chunk's work. (2**24, 64 MiB, measured 2x slower end to end.)
_CHUNK_ELEMENTS = 1 << 20


def _scaled(z: torch.Tensor, temperature: float) -> torch.Tensor:
    # fp32 at least: logsumexp over a 100k vocabulary in bf16 is off in the second digit.
    z = z.to(torch.promote_types(z.dtype, torch.float32))
    return z if temperature == 1.0 else z / temperature


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _over_row_chunks(
    fn: Callable[[torch.Tensor], torch.Tensor], logits: torch.Tensor, chunk_rows: int | None
) -> torch.Tensor:
    """Apply ``fn(logits_rows (N, V)) -> (N,)`` over row chunks of (B, T, V) logits (the entropy; the
    log-probs chunk inside `_TokenLogprobs`, whose backward is its own)."""
    lead, vocab = logits.shape[:-1], logits.shape[-1]
    flat = logits.reshape(-1, vocab)
    rows = _rows(vocab, chunk_rows)
    if flat.shape[0] <= rows:
        return fn(flat).view(lead)
    return torch.cat([fn(flat[i : i + rows]) for i in range(0, flat.shape[0], rows)]).view(lead)


def _rows(vocab: int, chunk_rows: int | None) -> int:
    return chunk_rows or max(1, _CHUNK_ELEMENTS // max(vocab, 1))


class _TokenLogprobs(torch.autograd.Function):
    """(N, V) logits, (N,) tokens -> (N,) log_softmax(logits / T)[token], chunk by chunk of rows."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, tokens: torch.Tensor, temperature: float, rows: int) -> torch.Tensor:
        n = logits.shape[0]
        out_dtype = torch.promote_types(logits.dtype, torch.float32)
        out = torch.empty(n, dtype=out_dtype, device=logits.device)
        lse = torch.empty(n, dtype=out_dtype, device=logits.device)
        for i in range(0, n, rows):
            z = _scaled(logits[i : i + rows], temperature)
            lse[i : i + rows] = torch.logsumexp(z, dim=-1)
            out[i : i + rows] = z.gather(-1, tokens[i : i + rows, None]).squeeze(-1) - lse[i : i + rows]
        ctx.save_for_backward(logits, tokens, lse)
        ctx.temperature, ctx.rows = temperature, rows
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        # d/dz_v (z_y - logsumexp z) = [v = y] - softmax(z)_v, and z = logits / T
        logits, tokens, lse = ctx.saved_tensors
        t, rows = ctx.temperature, ctx.rows
        grad = torch.empty_like(logits)
        for i in range(0, logits.shape[0], rows):
            g = grad_out[i : i + rows, None].to(lse.dtype)
            gz = (_scaled(logits[i : i + rows], t) - lse[i : i + rows, None]).exp_().mul_(-g)
            gz.scatter_add_(-1, tokens[i : i + rows, None], g)
            grad[i : i + rows] = gz if t == 1.0 else gz.div_(t)
        return grad, None, None, None


def token_logprobs(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float = 1.0,
    *,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """Log-probability of each token under ``softmax(logits / temperature)``.

    No shift is applied: ``logits[:, t]`` scores ``tokens[:, t]``. For a causal LM whose output at
    position t predicts token t + 1, pass ``logits[:, :-1]`` and ``input_ids[:, 1:]``.

    The temperature must be the one used for sampling so that the PPO ratio compares the same
    distribution the rollout engine sampled from.

    Args:
        logits: (B, T, V) any float dtype; its gradient comes back in the same dtype.
        tokens: (B, T) int64 ids in [0, V); padded positions need a valid id (e.g. the pad id).
        temperature: > 0.
        chunk_rows: rows of B*T processed at once; default keeps each chunk near 2**20 elements.

    Returns:
        (B, T) log-probs in fp32 (fp64 if the logits are fp64).
    """
    _check_temperature(temperature)
    lead, vocab = logits.shape[:-1], logits.shape[-1]
    flat = logits.reshape(-1, vocab)
    return _TokenLogprobs.apply(flat, tokens.reshape(-1), float(temperature), _rows(vocab, chunk_rows)).view(lead)


def entropy_from_logits(
    logits: torch.Tensor, temperature: float = 1.0, *, chunk_rows: int | None = None
) -> torch.Tensor:
    """Entropy of ``softmax(logits / temperature)`` at each position.

    Uses ``H = logsumexp(z) - sum_v softmax(z)_v z_v``. Logits of -inf (vocabulary masking) are floored
    to the dtype's most negative finite value so that their ``0 * z`` term is 0, not NaN.

    Args:
        logits: (B, T, V) any float dtype.
        temperature: > 0.
        chunk_rows: as in :func:`token_logprobs`.

    Returns:
        (B, T) entropy in nats, fp32 (fp64 if the logits are fp64).
    """
    _check_temperature(temperature)

    def rows_entropy(z: torch.Tensor) -> torch.Tensor:
        z = _scaled(z, temperature).clamp_min(torch.finfo(torch.float32).min)
        return torch.logsumexp(z, dim=-1) - (torch.softmax(z, dim=-1) * z).sum(-1)

    return _over_row_chunks(rows_entropy, logits, chunk_rows)
