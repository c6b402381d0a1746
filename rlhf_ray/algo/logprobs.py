"""Per-token log-probabilities and entropy from logits, without materialising a full log-softmax.

``log_softmax(z)[y] = z[y] - logsumexp(z)``: gathering one logit per position and subtracting the
log-partition needs no (B, T, V) output tensor. The remaining (rows, V) temporaries (the fp32 upcast,
the temperature scaling, logsumexp's workspace) are bounded by processing rows in chunks. Under autograd
each chunk's scaled logits are still saved for backward; the chunking mainly bounds peak memory of the
no-grad passes (old and reference log-probs), where vocabularies of 150k make a full copy expensive.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# Elements per chunk (~64 MiB of fp32): large enough that the per-chunk Python overhead is negligible.
_CHUNK_ELEMENTS = 1 << 24


def _scaled(z: torch.Tensor, temperature: float) -> torch.Tensor:
    # fp32 at least: logsumexp over a 100k vocabulary in bf16 is off in the second digit.
    z = z.to(torch.promote_types(z.dtype, torch.float32))
    return z if temperature == 1.0 else z / temperature


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _over_row_chunks(
    fn: Callable[..., torch.Tensor], logits: torch.Tensor, *extra: torch.Tensor, chunk_rows: int | None
) -> torch.Tensor:
    """Apply ``fn(logits_rows (N, V), *extra_rows (N,)) -> (N,)`` over row chunks of (B, T, V) logits."""
    lead, vocab = logits.shape[:-1], logits.shape[-1]
    flat = logits.reshape(-1, vocab)
    flat_extra = [e.reshape(-1) for e in extra]
    n = flat.shape[0]
    rows = chunk_rows or max(1, _CHUNK_ELEMENTS // max(vocab, 1))
    if n <= rows:
        return fn(flat, *flat_extra).view(lead)
    parts = [fn(flat[i : i + rows], *(e[i : i + rows] for e in flat_extra)) for i in range(0, n, rows)]
    return torch.cat(parts).view(lead)


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
        logits: (B, T, V) any float dtype.
        tokens: (B, T) int64 ids in [0, V); padded positions need a valid id (e.g. the pad id).
        temperature: > 0.
        chunk_rows: rows of B*T processed at once; default keeps each chunk near 2**24 elements.

    Returns:
        (B, T) log-probs in fp32 (fp64 if the logits are fp64).
    """
    _check_temperature(temperature)

    def rows_logp(z: torch.Tensor, tok: torch.Tensor) -> torch.Tensor:
        z = _scaled(z, temperature)
        return z.gather(-1, tok.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z, dim=-1)

    return _over_row_chunks(rows_logp, logits, tokens, chunk_rows=chunk_rows)


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

    return _over_row_chunks(rows_entropy, logits, chunk_rows=chunk_rows)
