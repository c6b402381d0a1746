"""What one policy update computes, and no more: the LM head over the response positions only, and the
TIS proximal forward only when the update's own forward cannot stand in for it. Plus the log-prob agreement
thresholds chosen per precision."""
import pytest
import torch

from rlhf_ray.batch import pack_sequences
from rlhf_ray.config.schema import AlgorithmConfig, LearnerConfig, ReferenceConfig, SyncConfig
from rlhf_ray.learner.learner import Learner
from rlhf_ray.sync.checks import agreement_thresholds
from rlhf_ray.roles.losses import forward_response_logits
from rlhf_ray.roles.policy import PolicyWorker, has_dropout, proximal_is_live
from rlhf_ray.records import TrainBatch
from rlhf_ray.utils.device import LOGPROB_TOLERANCE, logprob_tolerance, resolve_backend
from tests.learner.helpers import model_cfg, plain_logprobs

LENGTHS = [2, 5, 3, 1, 4, 6]


# -- pure: when the update's forward is the proximal forward ---------------------------------------------
def test_proximal_is_live_exactly_when_the_update_takes_one_optimizer_step_without_dropout():
    plain = torch.nn.Sequential(torch.nn.Linear(2, 2))
    one = [[torch.arange(4)]]
    assert proximal_is_live(one, plain)
    assert not proximal_is_live([[torch.arange(2), torch.arange(2, 4)]], plain)  # two minibatches
    assert not proximal_is_live([[torch.arange(4)], [torch.arange(4)]], plain)   # two PPO epochs
    assert not proximal_is_live(one, torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.1)))


def test_dropout_is_seen_in_modules_and_in_the_model_config():
    m = torch.nn.Linear(2, 2)
    assert not has_dropout(m) and not has_dropout(torch.nn.Sequential(torch.nn.Dropout(0.0)))
    m.config = type("C", (), {"attention_dropout": 0.1})()
    assert has_dropout(m)


# -- pure: agreement thresholds per precision -------------------------------------------------------------
def test_agreement_thresholds_follow_the_loosest_precision_in_use_unless_the_config_sets_them():
    fp32, bf16 = LOGPROB_TOLERANCE["float32"], LOGPROB_TOLERANCE["bfloat16"]
    assert bf16[0] > fp32[0] and bf16[1] > fp32[1]
    assert logprob_tolerance(("float32", "float32")) == fp32
    assert logprob_tolerance(("float32", "bfloat16")) == bf16  # an fp32 learner against a bf16 engine
    assert logprob_tolerance(()) == fp32
    unset = SyncConfig()
    assert unset.logprob_max_abs_diff is None
    got = agreement_thresholds(unset, ("bfloat16",))
    assert (got.logprob_max_abs_diff, got.logprob_mean_abs_diff) == bf16
    got = agreement_thresholds(SyncConfig(logprob_mean_abs_diff=1e-4), ("bfloat16",))
    assert (got.logprob_max_abs_diff, got.logprob_mean_abs_diff) == (bf16[0], 1e-4)


# -- real learner (tiny Llama, CPU) -----------------------------------------------------------------------
def _learner(lr: float = 1e-3) -> Learner:
    return Learner(model_cfg(), LearnerConfig(micro_batch_size=3, optim={"lr": lr}), kind="policy",
                   init_path="builtin:tiny", backend=resolve_backend("cpu"), total_updates=4, seed=0, num_threads=2)


def _batch(learner) -> TrainBatch:
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 200, (n % 3 + 2,), generator=g).tolist() for n in LENGTHS]
    responses = [torch.randint(3, 200, (n,), generator=g).tolist() for n in LENGTHS]
    seq = pack_sequences(prompts, responses, learner.tokenizer.pad_token_id)
    full = plain_logprobs(learner, seq)
    # a generator that samples a little off the learner (another precision, another kernel): TIS weights != 1
    gen = (full + 0.05 * torch.randn(full.shape, generator=g)) * seq.response_mask
    adv = torch.randn(seq.response_mask.shape, generator=g) * seq.response_mask
    return TrainBatch(seq, gen, full.clone(), adv, adv.clone(), None)


@pytest.mark.slow
def test_response_logits_are_the_full_forward_at_the_response_positions():
    learner = _learner()
    seq = _batch(learner).seq
    with torch.no_grad():
        full = learner.forward_logits(seq.input_ids, seq.attention_mask, seq.position_ids)
        part = forward_response_logits(learner, seq)
    T = seq.response_mask.shape[1]
    assert part.shape == (len(seq), T, full.shape[-1])
    torch.testing.assert_close(part, full[:, seq.prompt_len - 1:seq.prompt_len - 1 + T], rtol=1e-5, atol=1e-5)


def _update(minibatches, live: bool, monkeypatch) -> tuple[dict, int]:
    import rlhf_ray.roles.policy as policy
    monkeypatch.setattr(policy, "proximal_is_live", (lambda mbs, model: live) if not live else policy.proximal_is_live)
    learner = _learner()
    batch = _batch(learner)
    worker = PolicyWorker(learner, AlgorithmConfig(loss_agg="token-mean", tis=True), ReferenceConfig(kl_coef=0.0),
                          temperature=1.0, norm_len=8)
    forwards, logprobs = [], worker.logprobs
    worker.logprobs = lambda seq: forwards.append(seq) or logprobs(seq)  # an update's only separate forward
    stats = worker.update(batch, minibatches, kl_coef=0.0).stats
    return stats, len(forwards)


@pytest.mark.slow
def test_one_step_update_skips_the_proximal_forward_and_computes_the_same_step(monkeypatch):
    one = [[torch.arange(len(LENGTHS))]]
    live, n_live = _update(one, True, monkeypatch)
    separate, n_separate = _update(one, False, monkeypatch)
    assert n_live == 0 and n_separate == 1
    assert abs(live["policy/objective"]) > 1e-4 and live["policy/grad_norm"] > 1e-4
    # TIS weights are not all 1 here, so the proximal log-probs really enter the loss
    assert live["policy/objective"] == pytest.approx(separate["policy/objective"], rel=1e-5, abs=1e-7)
    assert live["policy/grad_norm"] == pytest.approx(separate["policy/grad_norm"], rel=1e-4)


@pytest.mark.slow
def test_two_minibatches_still_run_the_proximal_forward(monkeypatch):
    _, n = _update([[torch.arange(3), torch.arange(3, 6)]], True, monkeypatch)
    assert n == 1
