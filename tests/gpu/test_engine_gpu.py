"""The vLLM engine on one CUDA GPU (the `vllm` CUDA build): sleep/wake around a weight update with the device
memory of each phase checked against the plan, and an fp8 engine taking adapter-only syncs whose log-probs
pass the agreement check against a bf16 learner."""
import pytest
import torch

from rlhf_ray.config.schema import RolloutConfig, SyncConfig
from rlhf_ray.utils.device import make_backend

from .helpers import tier, used_bytes

pytestmark = tier(1, "vllm", "peft")
PROMPTS = [[5, 17, 40, 3], [300, 12, 9, 77, 41, 8], list(range(10, 60))]
GiB = float(2 ** 30)


@pytest.fixture(scope="module")
def tiny_path():
    from rlhf_ray.models.kit import resolve_model_path
    return resolve_model_path("builtin:tiny")


def _hf(path, dtype):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).cuda().eval()


def test_sleep_wake_around_an_update_stays_within_the_plan(tiny_path):
    """Phases of a colocated step on one GPU: generate (engine awake) -> release (sleep level 1) -> a
    learner's update in the freed memory -> reclaim the weights, push new ones -> wake the KV cache ->
    generate with the new weights. Each phase's device use (all processes, contexts included) is held
    against the plan's items for that phase (`rlhf_ray.placement.memory.engine_items`)."""
    import json
    from pathlib import Path

    from rlhf_ray.roles.generator.engine import GeneratorEngine
    from rlhf_ray.placement.memory import PROCESS_OVERHEAD, engine_items
    from rlhf_ray.placement.shapes import ModelShape

    utilization = 0.3
    capacity = torch.cuda.mem_get_info(0)[1]
    shape = ModelShape.from_config(json.loads((Path(tiny_path) / "config.json").read_text()))
    items = engine_items(shape, dtype="bfloat16", quantization=None, tp=1, utilization=utilization,
                         capacity=capacity, enforce_eager=True, sleeps=True)
    plan = {p: sum(i.bytes for i in items if p in i.phases and not i.host) for p in ("generate", "train")}
    base = used_bytes()
    engine = GeneratorEngine(tiny_path, RolloutConfig(gpu_memory_utilization=utilization, max_new_tokens=8, seed=0),
                             make_backend("cuda", "bfloat16"), max_model_len=128,
                             engine_kwargs={"enable_sleep_mode": True})  # as the plan builds a colocated engine
    try:
        assert engine.can_sleep
        before = engine.generate(PROMPTS, n=1, temperature=0.0).response_ids
        awake = used_bytes() - base
        assert awake <= plan["generate"] + PROCESS_OVERHEAD, (awake / GiB, plan["generate"] / GiB)

        engine.release()
        asleep = used_bytes() - base
        assert asleep <= plan["train"] + PROCESS_OVERHEAD and asleep < 0.5 * awake, (asleep / GiB, awake / GiB)

        learner = _hf(tiny_path, torch.bfloat16)                   # the update runs in what the engine freed
        opt = torch.optim.AdamW(learner.parameters(), lr=0.5)
        ids = torch.tensor(PROMPTS[2], device="cuda")[None]
        learner.train()
        learner(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        learner.eval()
        training = used_bytes() - base
        assert training < awake, "the update should fit where the asleep engine was"

        engine.reclaim("weights")
        engine.load_full(((n, t.detach()) for n, t in learner.state_dict().items()), version=1)
        engine.reclaim("kv_cache")
        after = engine.generate(PROMPTS, n=1, temperature=0.0)
        assert after.weight_version == 1 and after.response_ids != before   # the pushed weights serve
        woken = used_bytes() - base
        learner_bytes = training - asleep
        assert woken <= plan["generate"] + PROCESS_OVERHEAD + learner_bytes, (woken / GiB, plan["generate"] / GiB)
    finally:
        engine.close()


def test_fp8_engine_with_adapter_sync_passes_the_agreement_check(tiny_path):
    from peft import LoraConfig, get_peft_model

    from rlhf_ray.roles.generator.engine import GeneratorEngine
    from rlhf_ray.sync.checks import agreement_thresholds, check_logprob_agreement, logprob_agreement
    from tests.generator.conftest import hf_logprobs

    cfg = RolloutConfig(max_new_tokens=12, seed=0, gpu_memory_utilization=0.3, temperature=1.0,
                        sync=SyncConfig(mode="adapter"))
    engine = GeneratorEngine(tiny_path, cfg, make_backend("cuda", "bfloat16"), lora=True, max_model_len=128,
                             max_lora_rank=8, quantization="fp8_per_tensor")
    try:
        policy = get_peft_model(_hf(tiny_path, torch.bfloat16),
                                LoraConfig(r=8, lora_alpha=16, init_lora_weights=False, target_modules=["q_proj", "v_proj"]))
        with torch.no_grad():
            for n, p in policy.named_parameters():
                if "lora_" in n:
                    p.normal_(0.0, 0.3)
        from peft import get_peft_model_state_dict
        engine.load_adapter(get_peft_model_state_dict(policy).items(),
                            policy.peft_config["default"].to_dict(), version=1)
        rollout = engine.generate(PROMPTS * 4, n=2, seeds=list(range(12)))
        assert rollout.weight_version == 1
        limits = agreement_thresholds(cfg.sync, ("bfloat16", "fp8"))
        learner_lp, engine_lp, mask = hf_logprobs(policy.cpu().float(), rollout)
        stats = logprob_agreement(learner_lp, engine_lp, mask)
        check_logprob_agreement(stats, limits, version=1)           # raises LogprobMismatchError past the limits
        with policy.disable_adapter():                              # the adapter mattered: the base disagrees more
            base = logprob_agreement(*hf_logprobs(policy, rollout))
        assert base.mean_abs > stats.mean_abs, (base, stats)
    finally:
        engine.close()
