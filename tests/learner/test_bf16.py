"""The bf16 learner path on a CPU with native bf16 (avx512_bf16 / AMX): what a GPU run uses, checked here.

On CPUs without it, bf16 matmuls are emulated and 7-500x slower (STACK.md), so the test is skipped there.
"""
from __future__ import annotations

import pytest
import torch

from rlhf_ray.learner.learner import Learner
from rlhf_ray.offline.stages import sft_step_loss
from rlhf_ray.batch import pack_sequences
from rlhf_ray.utils.device import cpu_has_fast_bf16, resolve_backend
from tests.learner.helpers import learner_cfg, model_cfg, plain_logprobs, split, token_batches


pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not cpu_has_fast_bf16(),
                                 reason="this CPU has no native bf16 (no avx512_bf16 / amx_bf16 flag): bf16 "
                                        "would be emulated, far too slow to test, and not the path a run uses")]


def _learner(dtype: str) -> Learner:
    return Learner(model_cfg(), learner_cfg(lr=3e-3), kind="policy", init_path="builtin:tiny",
                   backend=resolve_backend("cpu", dtype), total_updates=20, seed=0, num_threads=2)


def test_bf16_learner_trains_and_its_logprobs_stay_close_to_fp32():
    bf16, fp32 = _learner("bfloat16"), _learner("float32")
    assert {p.dtype for p in bf16.model.parameters()} == {torch.bfloat16}
    # The same sampled tokens scored by both: bf16 rounding (8 mantissa bits) moves log-probs by a few 0.01.
    g = torch.Generator().manual_seed(0)
    seq = pack_sequences([torch.randint(3, 300, (6,), generator=g).tolist() for _ in range(4)],
                         [torch.randint(3, 300, (n,), generator=g).tolist() for n in (3, 8, 5, 1)], 0)
    logp = {}
    for name, learner in (("bf16", bf16), ("fp32", fp32)):
        logp[name] = plain_logprobs(learner, seq)
    diff = (logp["bf16"] - logp["fp32"]).abs()
    assert 0 < diff.max() < 0.1, diff.max()  # bf16 really ran (not 0) and stays close
    # It learns: the SFT loss falls as in fp32, and the exported weights are bf16 tensors.
    losses = [bf16.train_step(sft_step_loss, split(b))["loss"] for b in token_batches(10)]
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses
    assert all(t.dtype == torch.bfloat16 for _, t in bf16.named_weights("full"))
