"""A ZeRO-3 learner's model is built partitioned (under `deepspeed.zero.Init`), not whole on every rank, and the
DeepSpeed config that made it so does not outlive the build (a model built next in the process loads whole)."""
from __future__ import annotations

import os

import pytest
import torch

from rlhf_ray.config.schema import LearnerConfig, ModelConfig
from rlhf_ray.learner.build import build_model
from rlhf_ray.learner.ds_config import deepspeed_config
from rlhf_ray.models.kit import resolve_model_path
from rlhf_ray.utils.device import resolve_backend

pytestmark = pytest.mark.slow  # starts DeepSpeed's process group


def _partitioned(model: torch.nn.Module) -> list[bool]:
    """Per parameter: partitioned by ZeRO-3 (a `ds_id`, and the local tensor emptied)."""
    return [hasattr(p, "ds_id") and p.numel() == 0 and p.ds_numel > 0 for p in model.parameters()]


def test_zero3_builds_under_zero_init_and_other_stages_do_not():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from transformers.integrations import is_deepspeed_zero3_enabled

    from rlhf_ray.learner.learner import ensure_process_group
    backend = resolve_backend("cpu")
    ensure_process_group(backend)
    path = resolve_model_path("builtin:tiny")
    ds = {stage: deepspeed_config(LearnerConfig(deepspeed={"zero_stage": stage}), world_size=1, dtype=torch.float32)
          for stage in (2, 3)}

    zero3 = build_model(ModelConfig(), "policy", path, backend, 0, deepspeed_config=ds[3])
    assert all(_partitioned(zero3)), "a ZeRO-3 model was built whole (no zero.Init)"
    assert not is_deepspeed_zero3_enabled()  # the config died with the build
    later = build_model(ModelConfig(), "policy", path, backend, 0)
    assert not any(_partitioned(later))
    zero2 = build_model(ModelConfig(), "value", path, backend, 0, deepspeed_config=ds[2])
    assert not any(_partitioned(zero2))
