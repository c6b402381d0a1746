"""Loss of one PPO minibatch for the policy and for the critic, from model outputs and a TrainBatch.

Pure torch: the learner calls these inside its forward/backward; tests call them on hand-made tensors.
"""
from __future__ import annotations

import torch

from rlhf_ray import algo
from rlhf_ray.config import AlgorithmConfig, ReferenceConfig
from rlhf_ray.records import TrainBatch


def policy_minibatch_loss(logits: torch.Tensor, logp: torch.Tensor, mb: TrainBatch, algo_cfg: AlgorithmConfig,
                          ref_cfg: ReferenceConfig, kl_coef: float, temperature: float, norm_len: int,
                          proximal_logp: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The policy's loss on one minibatch: clipped surrogate (+ KL term) (+ entropy bonus).

    logits: (B, T, V) the response positions' logits (`rlhf_ray.roles.micro.forward_response_logits`); logp: (B, T)
    their log-probs of the sampled tokens (with grad), computed once by the caller, which also reads them
    for the agreement check and, with a single optimizer step, as the proximal log-probs.

    With `proximal_logp` (B, T), the learner's own log-probs before this update (algorithm.tis=true), the
    PPO ratio is taken against them and each token's loss is weighted by the truncated importance
    weight min(pi_prox / pi_generator, algorithm.tis_cap): the batch was sampled by the generator, whose
    weights may lag and whose kernels (or precision) differ (rlhf_ray.algo.offpolicy).
    """
    mask = mb.seq.response_mask
    old_logp, is_weights, tis_stats = mb.old_logp, None, {}
    if proximal_logp is not None:
        is_weights, tis_stats = algo.truncated_is_weights(proximal_logp, mb.old_logp, mask, algo_cfg.tis_cap)
        old_logp = proximal_logp
    loss, stats = algo.policy_loss(logp, old_logp, mb.advantages, mask, clip_low=algo_cfg.clip_low,
                                   clip_high=algo_cfg.clip_high, dual_clip=algo_cfg.dual_clip,
                                   agg=algo_cfg.loss_agg, norm_len=norm_len, is_weights=is_weights)
    stats.update(tis_stats)
    if not ref_cfg.kl_in_reward and kl_coef > 0:
        kl, kl_stats = algo.kl_loss(logp, mb.ref_logp, mask, coef=kl_coef, kind=ref_cfg.kl_kind,
                                    agg=algo_cfg.loss_agg, norm_len=norm_len)
        loss = loss + kl
        stats.update(kl_stats)
    # Entropy is always reported (operators watch it for collapse); it carries grad only when it is a loss term.
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
