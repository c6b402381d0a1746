"""Per-token log-probabilities and entropy from logits, without materialising a full log-softmax.

``log_softmax(z)[y] = z[y] - logsumexp(z)``: gathering one logit per position and subtracting the
log-partition needs no (B, T, V) output tensor. The (rows, V) work (the fp32 upcast, the temperature
scaling, the exponentials) goes through one reused fp32 buffer a small chunk of rows at a time, and the
backward is written by hand (`_TokenLogprobs`): it saves the logits as they came (bf16 stays bf16) and each
row's log-partition, recomputes the softmax chunk by chunk and writes the gradient straight into one tensor
of the logits' dtype. Autograd through chunked views instead keeps an fp32 copy of every chunk and zero-fills
a full-size gradient per chunk (SliceBackward): on SmolLM2's 1,536 x 49,152 logits that was 2.3 of a 5 s
bf16 update on a 2-core CPU, mostly page faults on those fresh 300 MB tensors. The entropy an update reports
comes from the same pass (`token_logprobs_and_entropy`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# Elements per chunk (4 MiB of fp32): a chunk's buffer stays in the CPU's last-level cache and below
# glibc's mmap threshold, so it is reused, not page-faulted in anew; Python's per-chunk cost (a few
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
    """(N, V) logits, (N,) tokens -> (N,) log_softmax(logits / T)[token] and, when asked, (N,) entropy (no
    gradient: the reported statistic), chunk by chunk of rows through one reused fp32 buffer.

    One pass computes both: with d = z - max(z) and e = exp(d), s = sum(e), log p(y) = d_y - log s and
    H = log s - sum(e d) / s. The separate log-prob and entropy passes upcast the logits twice and ran four
    exponentials per logit (two logsumexps and a softmax) on fresh temporaries; on a 2-core CPU those
    temporaries are page-faulted in anew each chunk, which made the (1,536 x 49,152) SmolLM2 logits' passes
    a fifth of a bf16 update."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, tokens: torch.Tensor, temperature: float, rows: int,
                want_entropy: bool):
        n, vocab = logits.shape
        dtype = torch.promote_types(logits.dtype, torch.float32)
        out = torch.empty(n, dtype=dtype, device=logits.device)
        lse = torch.empty(n, dtype=dtype, device=logits.device)
        entropy = torch.empty(n if want_entropy else 0, dtype=dtype, device=logits.device)
        d = torch.empty(min(rows, n), vocab, dtype=dtype, device=logits.device)
        e = torch.empty_like(d) if want_entropy else d
        for i in range(0, n, rows):
            z = d[: min(rows, n - i)]
            z.copy_(logits[i : i + rows])
            if temperature != 1.0:
                z.div_(temperature)
            top = z.amax(-1, keepdim=True)
            z.sub_(top)
            out[i : i + rows] = z.gather(-1, tokens[i : i + rows, None]).squeeze(-1)
            if want_entropy:  # a masked logit (-inf) gets e = 0 and e * z = 0 in the entropy, not 0 * -inf = NaN
                z.clamp_min_(torch.finfo(dtype).min)
            ez = torch.exp(z, out=e[: z.shape[0]])
            total = ez.sum(-1)
            log_total = total.log()
            if want_entropy:
                entropy[i : i + rows] = log_total - torch.linalg.vecdot(ez, z) / total
            out[i : i + rows] -= log_total
            lse[i : i + rows] = top.squeeze(-1) + log_total
        ctx.save_for_backward(logits, tokens, lse)
        ctx.temperature, ctx.rows = temperature, rows
        ctx.mark_non_differentiable(entropy)
        return out, entropy

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor, _grad_entropy):
        # d/dz_v (z_y - logsumexp z) = [v = y] - softmax(z)_v, and z = logits / T
        logits, tokens, lse = ctx.saved_tensors
        t, rows = ctx.temperature, ctx.rows
        n = logits.shape[0]
        grad = torch.empty_like(logits)
        buf = torch.empty(min(rows, n), logits.shape[1], dtype=lse.dtype, device=logits.device)
        for i in range(0, n, rows):
            p = buf[: min(rows, n - i)]
            g = grad_out[i : i + rows, None].to(lse.dtype) / t
            if t == 1.0:
                torch.sub(logits[i : i + rows], lse[i : i + rows, None], out=p)
            else:
                p.copy_(logits[i : i + rows]).div_(t).sub_(lse[i : i + rows, None])
            p.exp_()  # softmax(z)
            at_token = tokens[i : i + rows, None]
            g_token = g - p.gather(-1, at_token) * g  # (1 - p_y) g, in fp32 before the one rounding
            torch.mul(p, -g, out=grad[i : i + rows])  # -p g, rounded once to the logits' dtype
            grad[i : i + rows].scatter_(-1, at_token, g_token.to(grad.dtype))
        return grad, None, None, None, None


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
    return _fused(logits, tokens, temperature, chunk_rows, want_entropy=False)[0]


def token_logprobs_and_entropy(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float = 1.0,
    *,
    chunk_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``token_logprobs`` and ``entropy_from_logits`` from one pass over the logits: (B, T) log-probs with
    their gradient, (B, T) entropy without one (the statistic an update reports; an entropy bonus in the
    loss needs ``entropy_from_logits``, whose entropy carries a gradient)."""
    return _fused(logits, tokens, temperature, chunk_rows, want_entropy=True)


def _fused(logits, tokens, temperature, chunk_rows, want_entropy):
    _check_temperature(temperature)
    lead, vocab = logits.shape[:-1], logits.shape[-1]
    flat = logits.reshape(-1, vocab)
    logp, entropy = _TokenLogprobs.apply(flat, tokens.reshape(-1), float(temperature), _rows(vocab, chunk_rows),
                                         want_entropy)
    return logp.view(lead), (entropy.view(lead) if want_entropy else None)


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
