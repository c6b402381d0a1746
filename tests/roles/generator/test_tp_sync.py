"""A tensor-parallel engine (TP=2, vLLM's CPU backend in multiprocess mode) takes a full weight sync with no
folder in between: each TP worker joins a broadcast group and reloads its shard from the stream
(`rlhf_ray.roles.generator.worker_ext`). Either its engine relays a sync that reached it (the object-store
stream, a restore replay, a direct call), or the workers are ranks of the sender's group (collective
transport: 1 + sum(tp) ranks). Checked: greedy output equals HF greedy on the new weights, no safetensors
file is written under the engine's sync folder, and each worker received exactly one copy of the model.
Both on one engine (an engine start is about a minute on 2 idle cores)."""
from pathlib import Path

import pytest

from rlhf_ray.config.schema import RolloutConfig, SyncConfig
from rlhf_ray.utils.device import resolve_backend

from .conftest import hf_greedy, load_hf, named_weights, perturb

pytestmark = pytest.mark.slow
NEW = 8
EOS = 2
PROMPTS = [[5, 17, 40, 3], [300, 12, 9, 77, 41, 8], list(range(10, 60))]
CFG = RolloutConfig(tensor_parallel_size=2, n_samples_per_prompt=1, max_new_tokens=NEW, kv_cache_gib=1.0, seed=0,
                    cpus_per_engine=1, sync=SyncConfig(bucket_mb=0.05), enforce_eager=True)   # many buckets for the 6 MB model


def _cut(seq):
    return seq[:seq.index(EOS) + 1] if EOS in seq else seq


def _model_bytes(named) -> int:
    return sum(t.numel() * t.element_size() for _, t in named)


def _files(root) -> list:
    return sorted(str(p) for p in Path(root).rglob("*.safetensors"))


def test_tp2_engine_workers_are_ranks_of_the_collective_group_then_reload_a_relayed_broadcast(ray_local, tiny_path):
    """One TP=2 engine (an actor of the engine group), two syncs: first its workers are ranks of the learner's
    collective group, then the engine relays a sync that reached it to its workers."""
    import torch

    from rlhf_ray.roles.generator.group import GeneratorGroup, tied_names

    def relay(actor_self, named, version):  # nested: pickled by value (workers cannot import tests/)
        """In the engine actor, behind the group's back (its own version bookkeeping is not under test here): a
        sync that reached the engine itself (the object-store stream, a restore replay, a direct call), relayed
        to its TP workers; what each worker took, where folders would go, and its greedy answers after."""
        engine = actor_self.engine
        engine.load_full(iter(named), version=version)
        greedy = engine.generate(PROMPTS, n=1, temperature=0.0).response_ids
        return engine.workers_receive, list(engine.received), str(engine._scratch), greedy

    from rlhf_ray.sync.streamed import engine_transport
    group = GeneratorGroup(tiny_path, CFG, resolve_backend("cpu"), max_model_len=128)
    sync = engine_transport("collective", group, bucket_mb=CFG.sync.bucket_mb, dtype=torch.float32, timeout_s=60)
    try:
        learner = load_hf(tiny_path)
        before = group.submit(PROMPTS, n=1, temperature=0.0).result().response_ids
        assert before == [_cut(x) for x in hf_greedy(learner, PROMPTS, NEW)]
        perturb(learner, seed=22, scale=0.5)
        want = [_cut(x) for x in hf_greedy(learner, PROMPTS, NEW)]
        assert want != before                                  # the sync must change what the engine says
        stats = sync.send(named_weights(learner), "full", 1)
        assert sync._group[2] == (2,)                          # 1 + sum(tp) = 3 ranks: the driver, two workers
        sent = _model_bytes((n, t) for n, t in named_weights(learner) if n not in tied_names(tiny_path))
        assert stats.streamed.bytes >= sent
        actor = group.actors[0]
        assert ray_local.get(actor.received.remote()) == [sent, sent]
        root = ray_local.get(actor.__ray_call__.remote(lambda a: str(a.engine._scratch)))
        assert _files(root) == []                              # no folder in between
        # vLLM's sockets (the workers' message queues, the handshakes: eleven here) were made in the engine's
        # scratch, not the temp folder, where nothing removed them
        assert len([p for p in Path(root).iterdir() if p.is_socket()]) > 2
        assert group.submit(PROMPTS, n=1, temperature=0.0).result().response_ids == want

        perturb(learner, seed=21, scale=0.5)
        relayed = [_cut(x) for x in hf_greedy(learner, PROMPTS, NEW)]
        assert relayed != want
        named = [(n, t.detach().clone()) for n, t in named_weights(learner)]
        receive, received, root, greedy = ray_local.get(actor.__ray_call__.remote(relay, named, 2))
        assert receive and received == [_model_bytes(named)] * 2  # one copy per TP worker
        assert _files(root) == []
        assert greedy == relayed
    finally:
        sync.close()
        group.shutdown()
    assert not Path(root).exists()                             # and went with the engine's close
