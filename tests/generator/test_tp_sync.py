"""A tensor-parallel engine (TP=2, vLLM's CPU backend in multiprocess mode) takes a full weight sync through
what crosses its process boundary: the buckets as safetensors files in one folder and a
`reload_weights(weights_path=...)` call (rlhf_ray/sync/files.py). An iterator, the TP=1 path, cannot cross.
One engine start (about a minute on 2 idle cores), so one test."""
import pytest

from rlhf_ray.config.schema import RolloutConfig, SyncConfig
from rlhf_ray.utils.device import resolve_backend

from .conftest import hf_greedy, load_hf, named_weights, perturb

pytestmark = pytest.mark.slow
NEW = 8
EOS = 2
PROMPTS = [[5, 17, 40, 3], [300, 12, 9, 77, 41, 8], list(range(10, 60))]


def _cut(seq):
    return seq[:seq.index(EOS) + 1] if EOS in seq else seq


def test_tp2_engine_serves_the_synced_weights(tiny_path, monkeypatch):
    from rlhf_ray.generator.engine import GeneratorEngine
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")  # TP workers are processes of their own
    cfg = RolloutConfig(tensor_parallel_size=2, max_new_tokens=NEW, kv_cache_gib=1.0, seed=0,
                        sync=SyncConfig(bucket_mb=0.05))      # several files for the 6 MB model
    engine = GeneratorEngine(tiny_path, cfg, resolve_backend("cpu"), max_model_len=128)
    try:
        learner = load_hf(tiny_path)
        before = engine.generate(PROMPTS, n=1, temperature=0.0).response_ids
        assert before == [_cut(x) for x in hf_greedy(learner, PROMPTS, NEW)]
        perturb(learner, seed=21, scale=0.5)
        want = [_cut(x) for x in hf_greedy(learner, PROMPTS, NEW)]
        assert want != before                                  # the sync must change what the engine says
        engine.load_full(named_weights(learner), version=1)
        assert len(list((engine._adapter_root / "full").glob("weights-*.safetensors"))) > 1
        assert engine.generate(PROMPTS, n=1, temperature=0.0).response_ids == want
    finally:
        engine.close()
