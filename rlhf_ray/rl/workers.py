"""The RL passes of one learner rank: log-probs, reference log-probs, values and PPO updates.

Plain classes over a `Learner`, testable without Ray. On N ranks each rank runs them on its own share
of every minibatch (`rlhf_ray.rl.actors`), and DeepSpeed averages gradients across ranks.
"""
from __future__ import annotations

import torch

from rlhf_ray.config import AlgorithmConfig, ReferenceConfig
from rlhf_ray.rl.batch import SequenceBatch
from rlhf_ray.rl.records import TrainBatch
from rlhf_ray.rl.step_loss import critic_minibatch_loss, policy_minibatch_loss, response_logprobs
from rlhf_ray.sync.checks import logprob_agreement


# The learner's "loss" is the whole minimised objective (surrogate + KL + entropy terms); named apart so it
# neither overwrites nor adds into the algorithm's own "policy/loss" / "value/loss" statistic.
_OBJECTIVE = {"loss": "objective"}


def _micro(rows: torch.Tensor, size: int, mask: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """Micro-batches of a minibatch; each carries the minibatch's row and token counts (see _token_weight)."""
    total = torch.tensor([len(rows), float(mask[rows].sum())])
    return [{"idx": rows[i:i + size], "totals": total.expand(len(rows[i:i + size]), 2)}
            for i in range(0, len(rows), size)]


def _token_weight(agg: str, micro_mask: torch.Tensor, mb: dict) -> float:
    """The learner weights micro-batch losses by their share of rows. That is exact for sequence-mean
    aggregations; a token-mean over the minibatch needs the share of tokens instead, so rescale."""
    if agg != "token-mean":
        return 1.0
    rows_total, tokens_total = mb["totals"][0].tolist()
    rows, tokens = micro_mask.shape[0], float(micro_mask.sum())
    return (tokens / max(tokens_total, 1.0)) / (rows / rows_total)


def _forward(learner, seq: SequenceBatch) -> torch.Tensor:
    return learner.forward_logits(seq.input_ids, seq.attention_mask, seq.position_ids)


class PolicyWorker:
    def __init__(self, learner, algo_cfg: AlgorithmConfig, ref_cfg: ReferenceConfig, *, temperature: float,
                 norm_len: int):
        self.learner = learner
        self.algo, self.ref_cfg, self.mbs = algo_cfg, ref_cfg, learner.cfg.micro_batch_size
        self.temperature, self.norm_len = temperature, norm_len

    @property
    def version(self) -> int:
        return self.learner.version

    @torch.no_grad()
    def ref_logprobs(self, seq: SequenceBatch) -> torch.Tensor:
        """(B, T) reference log-probs: the same model with its LoRA adapter switched off."""
        self.learner.engine.eval()
        out = []
        with self.learner.reference_context():
            for i in range(0, len(seq), self.mbs):
                mb = seq.select(slice(i, i + self.mbs))
                out.append(response_logprobs(_forward(self.learner, mb).float(), mb, self.temperature).cpu())
        return torch.cat(out)

    def update(self, batch: TrainBatch, minibatches: list[list[torch.Tensor]], kl_coef: float) -> dict[str, float]:
        """PPO epochs: one optimizer step per minibatch. The very first forward (before any step) also
        measures the learner-vs-generator log-prob agreement of the sampled tokens."""
        agreement: dict[str, float] = {}
        sums: dict[str, float] = {}
        steps = 0

        def loss_fn(learner, mb):
            tb = batch.select(mb["idx"].cpu())
            logits = _forward(learner, tb.seq).float()
            loss, stats = policy_minibatch_loss(logits, tb, self.algo, self.ref_cfg, kl_coef, self.temperature,
                                                self.norm_len)
            loss = loss * _token_weight(self.algo.loss_agg, tb.seq.response_mask, mb)
            if steps == 0:
                logp = response_logprobs(logits.detach(), tb.seq, self.temperature)
                part = logprob_agreement(logp, tb.old_logp, tb.seq.response_mask)
                agreement["max_abs"] = max(agreement.get("max_abs", 0.0), part["max_abs"])
                n0, n1 = agreement.get("num_tokens", 0.0), part["num_tokens"]
                agreement["mean_abs"] = (agreement.get("mean_abs", 0.0) * n0 + part["mean_abs"] * n1) / max(n0 + n1, 1)
                agreement["num_tokens"] = n0 + n1
            return loss, stats

        for epoch in minibatches:
            for rows in epoch:
                stats = self.learner.train_step(loss_fn, _micro(rows, self.mbs, batch.seq.response_mask))
                steps += 1
                for k, v in stats.items():
                    key = k if "/" in k else f"policy/{_OBJECTIVE.get(k, k)}"
                    sums[key] = sums.get(key, 0.0) + v
        out = {k: v / max(steps, 1) for k, v in sums.items()}
        out.update({f"sync/logprob_{k}": v for k, v in agreement.items()})
        return out



class CriticWorker:
    """PPO's value model: the policy's backbone with a scalar head, trained with the clipped value loss."""

    def __init__(self, learner, algo_cfg: AlgorithmConfig, *, norm_len: int):
        self.learner = learner
        self.algo, self.mbs, self.norm_len = algo_cfg, learner.cfg.micro_batch_size, norm_len

    @torch.no_grad()
    def values(self, seq: SequenceBatch) -> torch.Tensor:
        """(B, T) V(s_t) for each response position t (the state before token t is emitted)."""
        self.learner.engine.eval()
        out, T, P = [], seq.response_mask.shape[1], seq.prompt_len
        for i in range(0, len(seq), self.mbs):
            mb = seq.select(slice(i, i + self.mbs))
            v = self.learner.forward_values(mb.input_ids, mb.attention_mask, mb.position_ids).float()
            out.append((v[:, P - 1:P - 1 + T] * mb.response_mask).cpu())
        return torch.cat(out)

    def update(self, batch: TrainBatch, minibatches: list[list[torch.Tensor]]) -> dict[str, float]:
        def loss_fn(learner, mb):
            tb = batch.select(mb["idx"].cpu())
            values = learner.forward_values(tb.seq.input_ids, tb.seq.attention_mask, tb.seq.position_ids).float()
            loss, stats = critic_minibatch_loss(values, tb, self.algo, self.norm_len)
            return loss * _token_weight(self.algo.loss_agg, tb.seq.response_mask, mb), stats

        sums: dict[str, float] = {}
        steps = 0
        for epoch in minibatches:
            for rows in epoch:
                for k, v in self.learner.train_step(loss_fn, _micro(rows, self.mbs, batch.seq.response_mask)).items():
                    key = k if "/" in k else f"value/{_OBJECTIVE.get(k, k)}"
                    sums[key] = sums.get(key, 0.0) + v
                steps += 1
        return {k: v / max(steps, 1) for k, v in sums.items()}
