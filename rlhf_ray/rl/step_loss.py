"""Loss of one PPO minibatch for the policy and for the critic, from model outputs and a TrainBatch.

Pure torch: the learner calls these inside its forward/backward; tests call them on hand-made tensors.
"""
from __future__ import annotations

import torch

from rlhf_ray import algo
from rlhf_ray.batch import response_logits, response_logprobs
from rlhf_ray.config import AlgorithmConfig, ReferenceConfig
from rlhf_ray.rl.records import TrainBatch


def policy_minibatch_loss(logits: torch.Tensor, mb: TrainBatch, algo_cfg: AlgorithmConfig,
                          ref_cfg: ReferenceConfig, kl_coef: float, temperature: float, norm_len: int,
                          ) -> tuple[torch.Tensor, dict[str, float]]:
    mask = mb.seq.response_mask
    logp = response_logprobs(logits, mb.seq, temperature)
    loss, stats = algo.policy_loss(logp, mb.old_logp, mb.advantages, mask, clip_low=algo_cfg.clip_low,
                                   clip_high=algo_cfg.clip_high, dual_clip=algo_cfg.dual_clip,
                                   agg=algo_cfg.loss_agg, norm_len=norm_len)
    if not ref_cfg.kl_in_reward and kl_coef > 0:
        kl, kl_stats = algo.kl_loss(logp, mb.ref_logp, mask, coef=kl_coef, kind=ref_cfg.kl_kind,
                                    agg=algo_cfg.loss_agg, norm_len=norm_len)
        loss = loss + kl
        stats.update(kl_stats)
    ent_logits = response_logits(logits, mb.seq.prompt_len, mask.shape[1])
    # Entropy is always reported (operators watch it for collapse); it carries grad only when it is a loss term.
    with torch.set_grad_enabled(algo_cfg.entropy_coef > 0 and torch.is_grad_enabled()):
        entropy = algo.entropy_from_logits(ent_logits, temperature=temperature)
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
