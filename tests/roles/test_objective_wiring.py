"""The loss glue calls the objective and the IS correction the config names (hand-made tensors, no learner)."""
import pytest
import torch

from rlhf_ray import algo
from rlhf_ray.batch import pack_sequences
from rlhf_ray.config import load_config
from rlhf_ray.records import TrainBatch
from rlhf_ray.roles.losses import policy_minibatch_loss


def _batch_and_logits():
    g = torch.Generator().manual_seed(0)
    seq = pack_sequences([[5, 6], [5, 6], [7], [7]], [[1, 2, 3], [4], [2, 2], [3, 1, 1]], pad_id=0)
    logits = torch.randn(4, 3, 11, generator=g, requires_grad=True)
    logp = algo.token_logprobs(logits, seq.response_ids)
    old = logp.detach() + 0.3 * torch.randn(4, 3, generator=g) * seq.response_mask
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])[:, None] * seq.response_mask
    return TrainBatch(seq, old, old.clone(), adv, adv.clone(), None), logits, logp


@pytest.mark.parametrize("name", ["grpo", "gspo", "cispo"])
def test_the_algorithms_objective_is_the_loss(name):
    cfg = load_config(None, [f"algorithm.name={name}", "reference.kl_coef=0"])
    tb, logits, logp = _batch_and_logits()
    loss, stats = policy_minibatch_loss(logits, logp, tb, cfg.algorithm, cfg.reference, 0.0, 1.0, 3)
    fn = algo.OBJECTIVES[algo.get_algorithm(name).objective]
    direct, _ = fn(logp, tb.old_logp, tb.advantages, tb.seq.response_mask, clip_low=cfg.algorithm.clip_low,
                   clip_high=cfg.algorithm.clip_high, dual_clip=None, agg=cfg.algorithm.loss_agg, norm_len=3)
    assert float(loss.detach()) == pytest.approx(float(direct.detach()), rel=1e-6)
    others = {n: algo.OBJECTIVES[n](logp, tb.old_logp, tb.advantages, tb.seq.response_mask, clip_low=0.2,
                                    clip_high=0.2, agg="token-mean")[0] for n in algo.OBJECTIVES}
    assert len({round(float(v.detach()), 6) for v in others.values()}) == 3  # the three differ on this batch


@pytest.mark.parametrize("kind", ["tis", "mis", "icepop", "seq_mask_tis"])
def test_the_named_correction_weighs_the_loss_and_logs_its_ratios(kind):
    cfg = load_config(None, [f"algorithm.is_correction={kind}", "reference.kl_coef=0"])
    tb, logits, logp = _batch_and_logits()
    prox = logp.detach()
    loss, stats = policy_minibatch_loss(logits, logp, tb, cfg.algorithm, cfg.reference, 0.0, 1.0, 3, prox)
    w, _ = algo.is_correction_weights(kind, prox, tb.old_logp, tb.seq.response_mask, cap=cfg.algorithm.is_cap,
                                      low=cfg.algorithm.is_low, high=cfg.algorithm.is_high)
    direct, _ = algo.policy_loss(logp, prox, tb.advantages, tb.seq.response_mask, agg=cfg.algorithm.loss_agg,
                                 norm_len=3, is_weights=w)
    assert float(loss.detach()) == pytest.approx(float(direct.detach()), rel=1e-6)
    assert {"is/token_ratio_mean", "is/seq_ratio_min", "is/seq_ratio_max", "is/masked_frac"} <= set(stats)
