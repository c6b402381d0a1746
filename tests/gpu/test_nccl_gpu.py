"""Weight sync over NCCL: the broadcast group between GPUs (its timeout reaching NCCL), and a learner ->
tensor-parallel (TP=2) engine sync through the generator group."""
import pytest
import torch
import torch.multiprocessing as mp

from rlhf_ray.utils.net import free_port

from .helpers import gpus, tier

pytestmark = tier(2)


def _named(device):
    g = torch.Generator().manual_seed(0)
    out = [(f"layer{i}.weight", torch.randn(256, 64 + i, generator=g).to(torch.bfloat16)) for i in range(6)]
    out.append(("ids", torch.arange(9)))
    return [(n, t.to(device)) for n, t in out]


def _rank(rank, port, out):
    from datetime import timedelta

    from rlhf_ray.buckets import pack_buckets
    from rlhf_ray.sync.collective import CollectiveGroup
    torch.cuda.set_device(rank)
    group = CollectiveGroup("127.0.0.1", port, rank, 2, "nccl", device=f"cuda:{rank}", timeout_s=45)
    try:
        options = getattr(group._pg, "options", None)
        if options is not None:
            assert options._timeout == timedelta(seconds=45), options._timeout
        if rank == 0:
            group.send_buckets(pack_buckets(_named("cuda:0"), bucket_bytes=64 << 10))
        else:
            got = [(n, t.cpu().clone()) for n, t in group.recv_named()]
            want = _named("cpu")
            assert [n for n, _ in got] == [n for n, _ in want]
            assert all(torch.equal(a, b) for (_, a), (_, b) in zip(got, want))
            (out / "ok").write_text("received")
    finally:
        group.close()


def test_nccl_group_broadcasts_buckets_between_gpus_with_its_timeout(tmp_path):
    mp.spawn(_rank, args=(free_port(), tmp_path), nprocs=2, join=True)
    assert (tmp_path / "ok").read_text() == "received"


@pytest.mark.skipif(gpus() < 3, reason="a learner GPU and a TP=2 engine need 3 GPUs")
def test_learner_to_tp2_engine_over_nccl(tmp_path):
    ray = pytest.importorskip("ray")
    pytest.importorskip("vllm")
    from rlhf_ray.config.schema import RolloutConfig
    from rlhf_ray.roles.generator.group import GeneratorGroup
    from rlhf_ray.models.kit import resolve_model_path
    from rlhf_ray.sync.streamed import engine_transport
    from rlhf_ray.utils.device import make_backend
    from tests.generator.conftest import hf_greedy, load_hf, perturb

    path = resolve_model_path("builtin:tiny")
    prompts = [[5, 17, 40, 3], [300, 12, 9, 77, 41, 8]]

    class GpuLearner:                               # the learner contract, weights on its own GPU
        def __init__(self):
            self.model = load_hf(path).cuda()
            perturb(self.model, seed=5, scale=0.5)

        def named_weights(self, mode, frozen=True):
            return iter(self.model.state_dict().items())

    ray.init(address="local", num_gpus=gpus(), include_dashboard=False)
    try:
        learner = ray.remote(num_gpus=1)(GpuLearner).remote()
        cfg = RolloutConfig(tensor_parallel_size=2, gpus_per_engine=2, max_new_tokens=8, seed=0,
                            gpu_memory_utilization=0.3)
        group = GeneratorGroup(path, cfg, make_backend("cuda", "float32"), max_model_len=128,
                               engine_kwargs={"distributed_executor_backend": "mp"})
        sync = engine_transport("collective", group, backend="nccl", device="cuda", bucket_mb=cfg.sync.bucket_mb,
                                dtype=torch.float32, timeout_s=120, restore_dir=str(tmp_path / "restore"))
        try:
            sync.send(learner, "full", 1)
            want = load_hf(path)
            perturb(want, seed=5, scale=0.5)
            got = group.submit(prompts, n=1, temperature=0.0).result()
            expect = [x[:x.index(2) + 1] if 2 in x else x for x in hf_greedy(want, prompts, 8)]
            assert got.weight_version == 1 and got.response_ids == expect
        finally:
            sync.close()
            group.shutdown()
    finally:
        ray.shutdown()
