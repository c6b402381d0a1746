"""An in-process engine and a DeepSpeed learner in one process (the colocated placement's shape): the learner
creates the process group, the engine joins it, and the engine's shutdown destroys it; a learner built after
that must start cleanly in a world of its own."""
import pytest
import torch

from rlhf_ray.config.schema import RolloutConfig
from rlhf_ray.offline.stages import sft_step_loss
from rlhf_ray.utils.device import resolve_backend
from tests.learner.helpers import make_learner, split, token_batches

pytestmark = pytest.mark.slow


def test_an_engine_closed_beside_a_learner_leaves_the_learners_process_group(tiny_path):
    from rlhf_ray.roles.generator.engine import GeneratorEngine
    learner = make_learner(zero=2)
    learner.train_step(sft_step_loss, split(token_batches(1)[0]))  # DeepSpeed now holds groups of this world
    engine = GeneratorEngine(tiny_path, RolloutConfig(max_new_tokens=4, kv_cache_gib=0.25, enforce_eager=True), resolve_backend("cpu"),
                             max_model_len=64)
    assert len(engine.generate([[5, 6, 7]], n=1, temperature=0.0).response_ids[0]) > 0
    engine.close()  # vLLM's engine shutdown destroys the process group it joined (vllm/v1/engine/core.py)
    assert not torch.distributed.is_initialized()
    # a learner built next starts a world of its own: it failed on the groups DeepSpeed had made of the old one
    # ("Group ... is not registered"), as the suite saw when learner tests ran after engine tests in one worker
    later = make_learner(zero=2)
    later.train_step(sft_step_loss, split(token_batches(1, seed=1)[0]))
    assert later.updates == 1
