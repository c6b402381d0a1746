"""Adapter-only sync over the gloo broadcast group (the cross-node transport), on one engine."""
import pytest
import torch

from rlhf_ray.config.schema import RolloutConfig
from rlhf_ray.utils.device import resolve_backend

from .conftest import adapter_config, hf_greedy, load_hf, named_weights, perturb, submit_as_the_roles_do

pytestmark = pytest.mark.slow
NEW = 6
CFG = RolloutConfig(num_engines=1, n_samples_per_prompt=1, max_new_tokens=NEW, cpus_per_engine=1, enforce_eager=True)


def _cut(seq, eos=2):
    return seq[:seq.index(eos) + 1] if eos in seq else seq


def test_adapter_versions_over_collective_and_restart(ray_local, tiny_path):
    from peft import LoraConfig, get_peft_model

    from rlhf_ray.roles.generator.group import GeneratorGroup
    from rlhf_ray.sync.streamed import engine_transport
    group = GeneratorGroup(tiny_path, CFG, resolve_backend("cpu"), lora=True, max_model_len=256, max_lora_rank=8)
    sync = engine_transport("collective", group, bucket_mb=CFG.sync.bucket_mb, dtype=torch.float32, timeout_s=60)
    try:
        policy = get_peft_model(load_hf(tiny_path), LoraConfig(r=8, lora_alpha=16, init_lora_weights=False,
                                                               target_modules=["q_proj", "v_proj"]))
        g = torch.Generator().manual_seed(3)
        prompts = [torch.randint(3, 500, (k,), generator=g).tolist() for k in (5, 12, 130)]
        for version, seed in ((1, 41), (2, 42)):
            perturb(policy, seed=seed, scale=0.2)
            sync.send(named_weights(policy, "adapter"), "adapter", version, adapter_config=adapter_config(policy))
            r = group.submit(prompts, n=1, temperature=0.0).result()
            assert r.response_ids == [_cut(x) for x in hf_greedy(policy, prompts, NEW)]
        assert r.weight_version == sync.served_version == 2

        ray_local.kill(group.actors[0], no_restart=False)      # restored from the object store
        r = submit_as_the_roles_do(group, prompts, n=1, temperature=0.0)
        assert r.weight_version == 2 and r.response_ids == [_cut(x) for x in hf_greedy(policy, prompts, NEW)]
        perturb(policy, seed=43, scale=0.2)                     # the group is rebuilt for the next push
        sync.send(named_weights(policy, "adapter"), "adapter", 3, adapter_config=adapter_config(policy))
        r = group.submit(prompts, n=1, temperature=0.0).result()
        assert r.weight_version == 3 and r.response_ids == [_cut(x) for x in hf_greedy(policy, prompts, NEW)]
    finally:
        sync.close()
        group.shutdown()
