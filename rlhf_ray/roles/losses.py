"""The policy's and the critic's loss on one PPO minibatch, and what makes it exact across micro-batches and ranks.

    forward_response_logits   (B, T, V) logits of the response tokens (shared prompts computed once)
    forward_sequence_values   (B, P + T) values of a value model (rows packed without their padding)
    policy_minibatch_loss     the algorithm's objective (+ KL term) (+ entropy bonus), IS-corrected when asked
    critic_minibatch_loss     the clipped value loss
    token_weight              the weight that keeps a minibatch's token-mean exact over micro-batches and ranks

Pure torch on model outputs and a `TrainBatch`: the learner calls these inside its forward/backward
(`rlhf_ray.roles.policy`, `rlhf_ray.roles.critic`); tests call them on hand-made tensors.
"""
from __future__ import annotations

import torch

from rlhf_ray import algo
from rlhf_ray.batch import SequenceBatch
from rlhf_ray.config import AlgorithmConfig, ReferenceConfig
from rlhf_ray.models import packed
from rlhf_ray.models.shared_prompt import response_logits_of
from rlhf_ray.records import TrainBatch

# The learner's "loss" is the whole minimised objective (surrogate + KL + entropy terms); named apart so it
# neither overwrites nor adds into the algorithm's own "policy/loss" / "value/loss" statistic.
OBJECTIVE = {"loss": "objective"}


def token_weight(agg: str, micro_mask: torch.Tensor, mb: dict) -> float:
    """The learner weights a micro-batch's loss by its share of its rank's rows (n / R_rank) and DeepSpeed
    averages the W ranks: a micro-batch counts n / R of the minibatch (R = W * R_rank rows in all). That is
    exact for sequence-mean aggregations; a token-mean over the minibatch needs its share of the
    minibatch's tokens (t / T, T over all ranks), so rescale by (t / T) / (n / R). With T counted per rank
    instead, ranks holding fewer tokens would weigh more than one rank weighs them
    (tests/rl/test_ranks_token_mean.py)."""
    if agg != "token-mean":
        return 1.0
    rows_total, tokens_total = mb["totals"][0].tolist()
    rows, tokens = micro_mask.shape[0], float(micro_mask.sum())
    return (tokens / max(tokens_total, 1.0)) / (rows / rows_total)


def forward_response_logits(learner, seq: SequenceBatch) -> torch.Tensor:
    """(B, T, V) logits that predict each response token: the LM head over those positions only, and each
    distinct prompt of the micro-batch computed once (`rlhf_ray.models.shared_prompt`), or, where rows share
    no prompt, the rows packed without their padding when that computes fewer positions (`models.packed`)."""
    return response_logits_of(learner.forward, seq, learner.shares_prompts, learner.packed_mask_dtype)


def forward_sequence_values(learner, seq: SequenceBatch) -> torch.Tensor:
    """(B, P + T) per-position values of a value model over `seq`, its rows packed without their padding
    where that saves rows (`rlhf_ray.models.packed`; the value head costs nothing beside the body, so
    fewer packed positions are all gain)."""
    dtype = learner.packed_mask_dtype
    rows = packed.pack_rows(seq) if dtype is not None else None
    if rows is None:
        return learner.forward_values(seq.input_ids, seq.attention_mask, seq.position_ids)
    return rows.unpack(learner.forward(**rows.model_inputs(dtype)).logits.squeeze(-1))


def policy_minibatch_loss(logits: torch.Tensor, logp: torch.Tensor, mb: TrainBatch, algo_cfg: AlgorithmConfig,
                          ref_cfg: ReferenceConfig, kl_coef: float, temperature: float, norm_len: int,
                          proximal_logp: torch.Tensor | None = None, entropy: torch.Tensor | None = None,
                          ) -> tuple[torch.Tensor, dict[str, float]]:
    """The policy's loss on one minibatch: the algorithm's objective (PPO's clipped surrogate, GSPO's, CISPO's)
    (+ KL term) (+ entropy bonus).

    logits: (B, T, V) the response positions' logits (`forward_response_logits`); logp: (B, T)
    their log-probs of the sampled tokens (with grad), computed once by the caller, which also reads them
    for the agreement check and, with a single optimizer step, as the proximal log-probs.

    With `proximal_logp` (B, T), the learner's own log-probs before this update (an algorithm.is_correction
    other than none), the PPO ratio is taken against them and each token's loss is weighted by the preset's
    importance weight of pi_prox / pi_generator (tis, mis, icepop, seq_mask_tis): the batch was sampled by the
    generator, whose weights may lag and whose kernels (or precision) differ (rlhf_ray.algo.offpolicy).

    `entropy` (B, T): computed with the log-probs in one pass (`algo.token_logprobs_and_entropy`, no gradient);
    None computes it here, with a gradient when the entropy bonus is a loss term.
    """
    mask = mb.seq.response_mask
    old_logp, is_weights, tis_stats = mb.old_logp, None, {}
    if proximal_logp is not None:
        is_weights, tis_stats = algo.is_correction_weights(algo_cfg.is_correction, proximal_logp, mb.old_logp, mask,
                                                           cap=algo_cfg.is_cap, low=algo_cfg.is_low,
                                                           high=algo_cfg.is_high)
        old_logp = proximal_logp
    objective = algo.get_algorithm(algo_cfg.name).objective  # ppo_clip, gspo or cispo (rlhf_ray.algo.objectives)
    loss, stats = algo.objective_loss(objective, logp, old_logp, mb.advantages, mask, clip_low=algo_cfg.clip_low,
                                      clip_high=algo_cfg.clip_high, dual_clip=algo_cfg.dual_clip,
                                      agg=algo_cfg.loss_agg, norm_len=norm_len, is_weights=is_weights)
    stats.update(tis_stats)
    if not ref_cfg.kl_in_reward and kl_coef > 0:
        kl, kl_stats = algo.kl_loss(logp, mb.ref_logp, mask, coef=kl_coef, kind=ref_cfg.kl_kind,
                                    agg=algo_cfg.loss_agg, norm_len=norm_len)
        loss = loss + kl
        stats.update(kl_stats)
    # Entropy is always reported (operators watch it for collapse); it carries grad only when it is a loss term.
    if entropy is None or algo_cfg.entropy_coef > 0:
        with torch.set_grad_enabled(algo_cfg.entropy_coef > 0 and torch.is_grad_enabled()):
            entropy = algo.entropy_from_logits(logits, temperature=temperature)
    bonus, ent_stats = algo.entropy_bonus(entropy, mask, coef=algo_cfg.entropy_coef, agg=algo_cfg.loss_agg,
                                          norm_len=norm_len)
    if algo_cfg.entropy_coef > 0:
        loss = loss + bonus
    stats.update(ent_stats)
    return loss, stats


def critic_minibatch_loss(values: torch.Tensor, mb: TrainBatch, algo_cfg: AlgorithmConfig, norm_len: int,
                          ) -> tuple[torch.Tensor, dict[str, float]]:
    """values: (B, P+T) per-position values; the value of state s_t is read where token t is predicted."""
    T = mb.seq.response_mask.shape[1]
    v = values[:, mb.seq.prompt_len - 1:mb.seq.prompt_len - 1 + T]
    loss, stats = algo.value_loss(v, mb.old_values, mb.returns, mb.seq.response_mask, clip=algo_cfg.value_clip,
                                  agg=algo_cfg.loss_agg, norm_len=norm_len)
    return algo_cfg.value_coef * loss, stats
