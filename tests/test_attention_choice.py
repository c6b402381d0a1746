"""Which attention kernel each model of a run computes with: the plain ("eager") one on a CPU in bf16, where it
measured 2x SDPA's fused CPU kernel, transformers' default (SDPA) otherwise (rlhf_ray.utils.device). The learner's
models, the reference scorer's and a reward model's all take it from the one rule."""
import pytest
import torch

from rlhf_ray.learner import build
from rlhf_ray.config.schema import ModelConfig
from rlhf_ray.models.kit import resolve_model_path
from rlhf_ray.roles.reference import ReferenceScorer
from rlhf_ray.utils.device import attention_implementation, make_backend


def test_a_cpu_in_bf16_takes_the_kernel_it_measured_faster_and_nothing_else_measures(monkeypatch):
    from rlhf_ray.utils import capability
    record = {"bf16_attention_eager_ms": 14.0, "bf16_attention_sdpa_ms": 47.0}   # AMD EPYC Zen 4, 2 threads
    monkeypatch.setattr(capability, "cached_measure", lambda *a, **k: record)
    assert attention_implementation("cpu", torch.bfloat16) == "eager"
    record = {"bf16_attention_eager_ms": 20.0, "bf16_attention_sdpa_ms": 9.0}    # a CPU whose fused kernel wins
    assert attention_implementation("cpu", torch.bfloat16) is None
    monkeypatch.setattr(capability, "cached_measure", lambda *a, **k: pytest.fail("no probe outside CPU bf16"))
    assert attention_implementation("cpu", torch.float32) is None
    assert attention_implementation("cuda", torch.bfloat16) is None
    assert attention_implementation("cuda:0", torch.float16) is None


def test_the_learners_and_the_reference_scorers_models_take_the_rule():
    path = resolve_model_path("builtin:tiny")
    for dtype, want in (("bfloat16", attention_implementation("cpu", torch.bfloat16) or "sdpa"), ("float32", "sdpa")):
        backend = make_backend("cpu", dtype)
        for kind in ("policy", "value"):
            model = build.build_model(ModelConfig(path="builtin:tiny"), kind, path, backend, pad_token_id=0)
            assert model.config._attn_implementation == want, (kind, dtype)
        ref = ReferenceScorer(path, dtype=getattr(torch, dtype))
        assert ref.model.config._attn_implementation == want, dtype
