"""Every YAML under configs/ loads, validates and places its RL roles on its declared cluster (the CLI's preflight);
the GPU ones' memory is tests/placement/test_plan.py's."""
from pathlib import Path

import pytest

from rlhf_ray.config import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").rglob("*.yaml"))


def test_configs_were_found():
    names = {p.name for p in CONFIGS}
    assert len(CONFIGS) >= 5
    assert {"quickstart.yaml", "llama3.1-8b-qlora-4090.yaml", "llama3.1-8b-8xh100.yaml",
            "llama3.1-70b-4x8xh100.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_config_validates(path):
    from rlhf_ray.preflight import check_plan
    cfg = load_config(path)
    assert cfg.run.name
    check_plan(cfg)  # every role placed on the cluster it declares


def test_qlora_4090_is_a_single_gpu_adapter_run():
    cfg = load_config(next(p for p in CONFIGS if p.name == "llama3.1-8b-qlora-4090.yaml"))
    assert cfg.model.quantization.load_in_4bit and cfg.model.lora.enabled
    assert cfg.rollout.sync.mode == "adapter"
    assert cfg.cluster.num_nodes == 1 and cfg.cluster.gpus_per_node == 1


def test_70b_spans_four_nodes():
    cfg = load_config(next(p for p in CONFIGS if p.name == "llama3.1-70b-4x8xh100.yaml"))
    assert cfg.cluster.num_nodes == 4 and cfg.rollout.tensor_parallel_size == 8


@pytest.mark.parametrize("path", [p for p in CONFIGS if "gpu" in p.parts], ids=lambda p: p.name)
def test_gpu_configs_name_models_a_user_can_get(path):
    """Hub ids (or built-ins), never a folder that exists only on the author's machine; placement explicit."""
    from rlhf_ray.models.hub import is_hub_id
    cfg = load_config(path)
    models = [cfg.model.path, cfg.reference.path] + [s.path for s in cfg.reward.sources if s.kind == "model"]
    assert all(m is None or is_hub_id(m) or m.startswith(("builtin:", "stage:")) for m in models), models
    assert "placement:" in path.read_text()
