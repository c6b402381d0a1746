"""Colocated placement on a real local Ray: one process holds every role, hands weights over in process,
and the log-prob check catches an engine left on stale weights."""
from pathlib import Path

import pytest
import ray

from rlhf_ray.config import load_config
from rlhf_ray.models.kit import resolve_model_path
from rlhf_ray.placement.groups import release, reserve
from rlhf_ray.rl.controller import RLController, StepConfig
from rlhf_ray.placement.groups import check_fits
from rlhf_ray.rl.prompt_stream import PromptStream
from rlhf_ray.placement.shared import Paths
from rlhf_ray.rl.run import build_roles
from rlhf_ray.sync.checks import LogprobMismatchError

pytestmark = pytest.mark.slow

VADER = "rlhf_ray.data.builtin_reviews:vader_reward"


def _config(*extra):
    return load_config(None, [
        "run.stages=[rl]", f"reward.sources=[{{kind: function, path: '{VADER}'}}]", "cluster.placement=colocated",
        "rl.prompts_per_step=4", "rollout.n_samples_per_prompt=4", "algorithm.mini_batch_size=16",
        "rollout.max_new_tokens=8", "data.max_prompt_len=16", "rl.policy.optim.lr=1e-2",
        # exact in one process: any engine that serves other weights than the learner's fails the step
        "rollout.sync.logprob_max_abs_diff=1e-3", "rollout.sync.logprob_mean_abs_diff=1e-4",
        "rollout.enforce_eager=true", *extra])  # compiled decoding: roles/generator/test_engine_compiled.py


@pytest.fixture(scope="module")
def built(ray_local, tmp_path_factory):
    from transformers import AutoTokenizer
    from rlhf_ray.data.prompts import load_prompts

    cfg = _config()
    init = resolve_model_path("builtin:tiny")
    plan = check_fits(cfg)
    groups = reserve(plan, timeout_s=60)
    roles = build_roles(cfg, Paths(init, resolve_model_path, str(tmp_path_factory.mktemp("scratch"))), plan, groups,
                        total_updates=10)
    tok = AutoTokenizer.from_pretrained(init)
    prompts = load_prompts(cfg.data, tok, cfg.run.seed)
    yield cfg, roles, prompts, tok.pad_token_id
    scratch = ray.get([r.__ray_call__.remote(lambda rank: str(rank.engine._scratch)) for r in roles.ranks])
    roles.shutdown()
    release(groups)
    assert not any(Path(s).exists() for s in scratch)  # the ranks closed their engines before they were killed


@pytest.fixture
def graph(built):
    """The module's role graph (built once), its engines serving the learner's current weights whatever
    an earlier test left them on: each test starts from a graph in sync and assumes no step count."""
    import ray
    _, roles, _, _ = built
    roles.weights.push()
    served = ray.get([r.__ray_call__.remote(lambda rank: rank.engine.version) for r in roles.ranks])
    assert served == [roles.weights.version] * len(roles.ranks)
    return built


def _controller(graph):
    cfg, roles, prompts, pad = graph
    stream = PromptStream(prompts, cfg.rl.prompts_per_step, cfg.run.seed)
    return RLController(StepConfig.of(cfg), roles, stream, pad_id=pad)


def test_every_role_lives_in_one_process_per_rank(graph):
    from ray._private.state import actors  # the GCS actor table (the state API needs a dashboard)
    alive = [a["ActorClassName"] for a in actors().values() if a["State"] == "ALIVE"]
    assert alive == ["ColocatedRank"]  # no generator, reward or reference actors


def test_steps_hand_weights_over_in_process_and_stay_exact(graph):
    _, roles, _, _ = graph
    c = _controller(graph)
    start = roles.weights.version
    for step in (1, 2):  # one push per step, whatever the number of optimizer steps
        m = c.step().metrics
        assert m["sync/version"] == start + step == roles.weights.version
        assert m["sync/logprob_max_abs"] < 1e-3 and m["sync/logprob_num_tokens"] > 0
        assert m["sync/engine_s"] > 0 and "sync/buckets" not in m  # nothing was packed for a transport


def test_an_engine_left_on_stale_weights_is_caught(graph, monkeypatch):
    _, roles, _, _ = graph
    c = _controller(graph)
    c.step()
    # the learner moved on, the engines did not: the push is skipped, as if the weights had not changed
    monkeypatch.setattr(roles.weights, "push", lambda: None)
    c.step()  # trains on rollouts of the engine's (still current) version, then skips the push
    with pytest.raises(LogprobMismatchError):
        c.step()


def test_a_generation_runs_beside_the_learner_and_a_push_waits_for_it(graph):
    """The overlap mode's contract inside one rank: a generation (the engine thread) leaves the learner
    free to answer, and a weight push called after it runs only once it has finished."""
    import ray
    _, roles, prompts, _ = graph
    rank = roles.ranks[0]
    gen = rank.generate.remote([p.ids for p in prompts[:4]] * 64, 4, {"call_seed": 0}, True)
    learner = rank.updates.remote()
    first, _ = ray.wait([gen, learner], num_returns=1)
    assert first == [learner] and not ray.wait([gen], timeout=0)[0]  # answered while still sampling
    push = rank.sync.remote(roles.weights.transport.mode, roles.weights.version)
    ray.get(push)
    assert ray.wait([gen], timeout=0)[0] == [gen]  # the push waited for the generation called before it
    assert len(ray.get(gen)) == 4 * 64 * 4


def test_a_partial_rollout_continues_on_the_engine_under_the_pushed_weights(graph):
    """Partial rollouts (rollout.partial) on the real engine: each sequence's first 4 tokens are sampled at version v,
    a lockstep step then trains and pushes v + 1, and the rest continues from the sequence's tokens so far under
    v + 1. Each token keeps its own sampler's log-prob: the continuation's agree with the learner's weights now
    (exactly, in one process), the first chunk's do not (the learner moved since)."""
    import ray
    import torch
    from rlhf_ray.batch import pack_sequences, pad_ragged
    from rlhf_ray.rl.producer import sample_in_chunks
    _, roles, prompts, pad = graph
    c = _controller(graph)
    v = roles.weights.version
    calls = []

    def generate(ids, n, seed, limits):
        if len(calls) == 1:
            c.step()  # between the first chunk and the rest: an update and a push
        calls.append(roles.weights.version)
        return roles.submit(ids, n, seed, max_new_tokens=limits).result()

    r = sample_in_chunks(generate, [p.ids for p in prompts[:4]], 4, seed=0, budget=8, chunk=4)
    assert calls == [v, v + 1]
    assert r.weight_version == v and r.prompt_ids == [list(prompts[i].ids) for i in range(4) for _ in range(4)]
    versions = [row[:4] == [v] * min(4, len(row)) and row[4:] == [v + 1] * (len(row) - 4) for row in r.response_versions]
    assert all(versions) and any(len(row) > 4 for row in r.response_ids)
    seq = pack_sequences(r.prompt_ids, r.response_ids, pad)
    width = seq.response_mask.shape[1]
    now = ray.get(roles.ranks[0].__ray_call__.remote(lambda rank, s: rank.worker.logprobs(s), seq))
    sampled = pad_ragged(r.response_logprobs, width)
    by = pad_ragged([[float(x) for x in row] for row in r.response_versions], width)
    mask = seq.response_mask.bool()
    gap = (now - sampled).abs()
    assert float(gap[mask & (by == v + 1)].max()) < 1e-3  # the continuation: sampled by the weights trained now
    assert float(gap[mask & (by == v)].mean()) > 1e-3      # the first chunk: by the weights before the step
