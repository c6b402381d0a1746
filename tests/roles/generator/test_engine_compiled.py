"""The engine's default decoding on a CPU, as vLLM's own: the model's forward compiled once at the build
(`generator.engine.by_device`), in a process that starts with torch's dynamo off as a CPU run's role
processes do (`runtime.LOCAL_CPU_ENV`). Weight pushes into the compiled engine change what it computes,
exactly, through vLLM's reload (the first) and in place (the next)."""
import os
from pathlib import Path

import pytest

from rlhf_ray.config.schema import RolloutConfig
from rlhf_ray.utils.device import resolve_backend

from .conftest import cut_at_eos, hf_greedy, load_hf, named_weights, perturb

pytestmark = pytest.mark.slow
NEW = 8


def test_a_full_weight_engine_decodes_compiled_and_takes_pushes_exactly(tiny_path, monkeypatch):
    import torch._dynamo.utils

    from rlhf_ray.roles.generator.engine import GeneratorEngine
    monkeypatch.setenv("TORCHDYNAMO_DISABLE", "1")
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)  # this build is inductor's first use
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    engine = GeneratorEngine(tiny_path, RolloutConfig(max_new_tokens=NEW, kv_cache_gib=0.25), resolve_backend("cpu"),
                             max_model_len=128)
    try:
        # dynamo traced the model's forward while vLLM built the engine (with dynamo left off, vLLM's compile
        # mode runs the forward eager and says nothing), and the process has its own setting back
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs
        assert os.environ["TORCHDYNAMO_DISABLE"] == "1"
        # inductor's cache outside the engine's scratch, which goes at the close: the next engine compiles into it
        assert not Path(os.environ["TORCHINDUCTOR_CACHE_DIR"]).is_relative_to(engine._scratch)
        learner = load_hf(tiny_path)
        prompts = [[5, 17, 40, 99], list(range(30, 70)), [7] * 9]
        assert engine.generate(prompts, n=1, temperature=0.0).response_ids == [
            cut_at_eos(x) for x in hf_greedy(learner, prompts, NEW)]
        for version in (1, 2):  # vLLM's reload, then in place
            perturb(learner, seed=10 + version)
            want = [cut_at_eos(x) for x in hf_greedy(learner, prompts, NEW)]
            engine.load_full(named_weights(learner), version=version)
            assert engine.generate(prompts, n=1, temperature=0.0).response_ids == want, version
        assert engine.pushed_in_place
    finally:
        engine.close()
