"""The learner on one CUDA GPU (DeepSpeed, transformers, peft, bitsandbytes; no vLLM, no Ray):
the 4-bit (QLoRA) learner's reference is its base with the adapter off, and a resumed learner draws
the CUDA random numbers the uninterrupted one would have."""
import pytest
import torch

from rlhf_ray.config.schema import LearnerConfig, ModelConfig
from rlhf_ray.utils.device import resolve_backend

from .helpers import tier

pytestmark = tier(1, "deepspeed", "peft", "bitsandbytes")


def _learner(qlora: bool):
    from rlhf_ray.learner.learner import Learner
    model = ModelConfig(path="builtin:tiny", lora={"enabled": True, "r": 8}, quantization={"load_in_4bit": qlora})
    cfg = LearnerConfig(micro_batch_size=4, optim={"lr": 1e-3}, deepspeed={"zero_stage": 0})
    return Learner(model, cfg, kind="policy", init_path="builtin:tiny", backend=resolve_backend("cuda", "bfloat16"),
                   total_updates=4, seed=0)


def _ids():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 500, (4, 24), generator=g)
    return ids, torch.ones_like(ids)


@torch.no_grad()
def test_qlora_reference_is_the_4bit_base_with_the_adapter_off():
    trained, fresh = _learner(qlora=True), _learner(qlora=True)   # fresh: LoRA B = 0, so it computes the base
    assert any(type(m).__name__ == "Linear4bit" for m in trained.model.modules()), "the base is not 4-bit"
    assert next(p for n, p in trained.model.named_parameters() if "lora_" in n).is_cuda
    for name, p in trained.model.named_parameters():
        if "lora_B" in name:
            p.normal_(0.0, 0.5)                                      # an adapter that changes the function
    ids, mask = _ids()
    trained.ds_engine.eval()
    fresh.ds_engine.eval()
    base = fresh.forward_logits(ids, mask).float()
    with trained.reference_context():
        reference = trained.forward_logits(ids, mask).float()
    policy = trained.forward_logits(ids, mask).float()
    assert (policy - base).abs().max() > 0.05                          # the adapter is on outside the context
    assert torch.allclose(reference, base, atol=1e-3, rtol=0), (reference - base).abs().max()


def test_resume_restores_the_cuda_rng(tmp_path):
    learner = _learner(qlora=False)
    torch.cuda.manual_seed_all(123)
    torch.randn(3, device="cuda")                                       # move the generator along a little
    learner.save_checkpoint(tmp_path / "ckpt", extra_state={})
    after_save = torch.randn(1000, device="cuda")                       # what the run draws next (dropout, sampling)
    torch.randn(77, device="cuda")                                      # the run went on; then it was killed
    learner.load_checkpoint(tmp_path / "ckpt")
    assert torch.equal(torch.randn(1000, device="cuda"), after_save)
    assert not torch.equal(torch.randn(1000, device="cuda"), after_save)  # the check can tell draws apart
