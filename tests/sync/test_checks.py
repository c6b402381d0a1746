import math

import pytest
import torch

from rlhf_ray.config.schema import SyncConfig
from rlhf_ray.sync.checks import (Agreement, LogprobMismatchError, StaleWeightsError, check_logprob_agreement,
                                  check_version, logprob_agreement)


def test_agreement_hand_computed_ignores_padding():
    learner = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, 9.0]])
    gen = torch.tensor([[-1.1, -2.0, -2.5], [-0.5, -0.3, -100.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    stats = logprob_agreement(learner, gen, mask)
    assert stats.num_tokens == 5
    assert stats.max_abs == pytest.approx(0.5)
    assert stats.mean_abs == pytest.approx((0.1 + 0 + 0.5 + 0 + 0.2) / 5)


def test_agreement_empty_mask_and_shape_mismatch():
    z = torch.zeros(2, 3)
    assert logprob_agreement(z, z, torch.zeros(2, 3)) == Agreement(0.0, 0.0, 0)
    with pytest.raises(ValueError, match="shapes differ"):
        logprob_agreement(z, torch.zeros(2, 4), torch.ones(2, 3))


def test_parts_merge_into_the_whole_batch_agreement():
    """Micro-batches or ranks over disjoint tokens merge to what the whole batch gives at once."""
    learner = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, 9.0], [-4.0, -1.0, -1.0]])
    gen = torch.tensor([[-1.1, -2.0, -2.5], [-0.5, -0.3, -100.0], [-3.0, -1.0, -1.5]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0]])
    parts = [logprob_agreement(learner[i:j], gen[i:j], mask[i:j]) for i, j in ((0, 1), (1, 3))]
    whole, merged = logprob_agreement(learner, gen, mask), Agreement.merge(parts)
    assert merged.num_tokens == whole.num_tokens == 6 and merged.max_abs == whole.max_abs == 1.0
    assert merged.mean_abs == pytest.approx(whole.mean_abs, rel=1e-12)
    assert Agreement.merge([]) == Agreement(0.0, 0.0, 0)
    assert (merged.token_ratio_min, merged.token_ratio_max, merged.seq_ratio_min, merged.seq_ratio_max) == (
        whole.token_ratio_min, whole.token_ratio_max, whole.seq_ratio_min, whole.seq_ratio_max)
    assert merged.metrics() == {"sync/logprob_max_abs": 1.0, "sync/logprob_mean_abs": merged.mean_abs,
                                # learner - generator: (0.1, 0, -0.5), (0, -0.2), (-1): per sequence -0.4/3, -0.1, -1
                                "sync/logprob_num_tokens": 6.0, "sync/token_ratio_min": pytest.approx(math.exp(-1.0)),
                                "sync/token_ratio_max": pytest.approx(math.exp(0.1)),
                                "sync/seq_ratio_min": pytest.approx(math.exp(-1.0)),
                                "sync/seq_ratio_max": pytest.approx(math.exp(-0.1))}


def test_token_and_sequence_ratios_by_hand():
    # log-ratios learner - generator: row 0 (0.1, -0.1, 0.6) -> geometric mean e^0.2; row 1 (0.0) -> 1
    learner = torch.tensor([[0.1, -0.1, 0.6], [0.0, 0.0, 0.0]])
    stats = logprob_agreement(learner, torch.zeros(2, 3), torch.tensor([[1, 1, 1], [1, 0, 0]]))
    assert stats.token_ratio_min == pytest.approx(math.exp(-0.1)) and stats.token_ratio_max == pytest.approx(
        math.exp(0.6))
    assert stats.seq_ratio_min == pytest.approx(1.0) and stats.seq_ratio_max == pytest.approx(math.exp(0.2))


def test_a_mismatch_over_the_bound_fails_or_is_corrected_by_the_named_preset_never_silently():
    over = Agreement(0.9, 0.01, 10)
    with pytest.raises(LogprobMismatchError, match="on_logprob_mismatch=correct"):  # fail (default) says the way out
        check_logprob_agreement(over, SyncConfig(logprob_max_abs_diff=0.5), version=2, correction="icepop")
    cfg = SyncConfig(logprob_max_abs_diff=0.5, on_logprob_mismatch="correct")
    line = check_logprob_agreement(over, cfg, version=2, correction="icepop")
    assert "max |diff| 0.9" in line and "algorithm.is_correction=icepop" in line and "\n" not in line
    assert check_logprob_agreement(Agreement(0.1, 0.01, 10), cfg, correction="icepop") is None
    with pytest.raises(LogprobMismatchError):  # nothing to correct with
        check_logprob_agreement(over, cfg, correction="none")
    with pytest.raises(LogprobMismatchError):  # no weight corrects a NaN
        check_logprob_agreement(Agreement(math.nan, math.nan, 1), cfg, correction="tis")


def test_check_passes_within_thresholds_and_names_numbers_when_over():
    cfg = SyncConfig(logprob_max_abs_diff=0.5, logprob_mean_abs_diff=0.02)
    check_logprob_agreement(Agreement(0.49, 0.019, 10), cfg, version=3)
    with pytest.raises(LogprobMismatchError, match=r"version 7.*max \|diff\| 0\.6 > rollout\.sync\.logprob_max_abs_diff"):
        check_logprob_agreement(Agreement(0.6, 0.001, 10), cfg, version=7)
    with pytest.raises(LogprobMismatchError, match="logprob_mean_abs_diff"):
        check_logprob_agreement(Agreement(0.1, 0.05, 10), cfg)


def test_check_fails_on_nan_and_is_off_when_disabled():
    nan = Agreement(math.nan, math.nan, 1)
    with pytest.raises(LogprobMismatchError):
        check_logprob_agreement(nan, SyncConfig())
    check_logprob_agreement(nan, SyncConfig(logprob_check=False))


def test_check_version():
    assert check_version(5, 5, 0) == 0
    assert check_version(4, 5, 1) == 1
    with pytest.raises(StaleWeightsError, match=r"version 4 but the learner is at version 6 \(lag 2 > .*=1\)"):
        check_version(4, 6, 1)
    with pytest.raises(StaleWeightsError, match="newer"):
        check_version(6, 5, 0)
