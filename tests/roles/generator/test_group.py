"""GeneratorGroup on a local Ray: two engines, in-order results, weight sync (`rlhf_ray.sync.streamed`), a killed
engine healed."""
import pytest
import torch

from rlhf_ray.config.schema import RolloutConfig
from rlhf_ray.utils.device import resolve_backend

from .conftest import hf_greedy, load_hf, named_weights, perturb, submit_as_the_roles_do

pytestmark = pytest.mark.slow
NEW = 6
CFG = RolloutConfig(num_engines=2, n_samples_per_prompt=2, temperature=0.8, max_new_tokens=NEW, cpus_per_engine=1,
                    seed=0, enforce_eager=True)  # compiled decoding: test_engine_compiled.py


def _prompts():
    g = torch.Generator().manual_seed(2)
    return [torch.randint(3, 500, (k,), generator=g).tolist() for k in (4, 9, 13, 6, 140)]


def _cut(seq, eos=2):
    return seq[:seq.index(eos) + 1] if eos in seq else seq


def _expect_greedy(group, model, prompts):
    r = submit_as_the_roles_do(group, prompts, n=2, temperature=0.0)
    want = [_cut(x) for x in hf_greedy(model, prompts, NEW)]
    assert r.prompt_index == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert r.response_ids == [w for w in want for _ in range(2)]
    assert [p for p in r.prompt_ids[::2]] == prompts
    return r


@pytest.fixture(scope="module")
def group(ray_local, tiny_path):
    from rlhf_ray.roles.generator.group import GeneratorGroup
    g = GeneratorGroup(tiny_path, CFG, resolve_backend("cpu"), lora=False, max_model_len=256)
    yield g
    g.shutdown()


@pytest.fixture(scope="module")
def sync(group):
    """The weight sync to the group's engines: "auto" picks the object store (every engine on this node)."""
    from rlhf_ray.sync.streamed import engine_transport
    s = engine_transport("auto", group, bucket_mb=CFG.sync.bucket_mb, dtype=torch.float32)
    yield s
    s.close()


def test_two_engines_serve_one_batch_in_order(group, sync, tiny_path):
    from rlhf_ray.sync.streamed import ObjectStore
    assert isinstance(sync, ObjectStore) and len(group.actors) == 2
    r = _expect_greedy(group, load_hf(tiny_path), _prompts())
    assert r.weight_version == 0


def test_sampling_is_reproducible_across_calls_with_explicit_seeds(group):
    a = group.submit(_prompts()[:3], seeds=[7, 8, 9]).result()
    b = group.submit(_prompts()[:3], seeds=[7, 8, 9]).result()
    assert a.response_ids == b.response_ids and len(a) == 6


@pytest.fixture(scope="module")
def learner_actor(ray_local, tiny_path, standin_learner_cls):
    actor = ray_local.remote(num_cpus=0)(standin_learner_cls).remote(tiny_path, 32)
    yield actor
    ray_local.kill(actor)


def _learner_weights(tiny_path):
    """The stand-in learner actor's weights (`learner_actor` perturbs the tiny model with seed 32)."""
    model = load_hf(tiny_path)
    perturb(model, seed=32)
    return model


def test_full_sync_from_iterator_then_from_learner_actor(group, sync, tiny_path, learner_actor):
    v = sync.served_version
    learner = load_hf(tiny_path)
    perturb(learner, seed=31)
    stats = sync.send(named_weights(learner), "full", v + 1)
    assert sync.served_version == stats.version == v + 1 and stats.streamed.buckets >= 1
    assert _expect_greedy(group, learner, _prompts()).weight_version == v + 1

    sync.send(learner_actor, "full", v + 2)   # packed inside the learner's process
    assert _expect_greedy(group, _learner_weights(tiny_path), _prompts()).weight_version == v + 2


def test_killed_engine_comes_back_with_current_weights(group, sync, tiny_path, ray_local, learner_actor):
    current = sync.served_version + 1  # this test's own sync: it needs no other test to have run first
    sync.send(learner_actor, "full", current)
    ray_local.kill(group.actors[0], no_restart=False)
    r = _expect_greedy(group, _learner_weights(tiny_path), _prompts())  # engine 0 restarted at 0, healed
    assert r.weight_version == current
    assert ray_local.get([a.version.remote() for a in group.actors]) == [current, current]


def test_an_engine_killed_between_the_pushs_check_and_its_load_is_healed_and_pushed_again(
        group, sync, tiny_path, ray_local, learner_actor, monkeypatch):
    """The push checks every engine's version first (a restarted one is healed there); an engine killed right
    after that check fails its load call: it is healed once Ray has restarted it, and the version pushed again."""
    current = sync.served_version + 1
    checked = group.ensure_synced

    def check_then_kill(*args, **kwargs):
        healed = checked(*args, **kwargs)
        if not kill.done:
            kill.done = True
            ray_local.kill(group.actors[0], no_restart=False)
        return healed
    kill = type("Once", (), {"done": False})
    monkeypatch.setattr(group, "ensure_synced", check_then_kill)
    sync.send(learner_actor, "full", current)
    assert kill.done
    assert ray_local.get([a.version.remote() for a in group.actors]) == [current, current]
    assert _expect_greedy(group, _learner_weights(tiny_path), _prompts()).weight_version == current
