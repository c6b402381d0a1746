"""PPO's critic under LoRA and under QLoRA in real runs through the CLI: it trains (its LoRA B matrices leave
0 in the checkpoint it saved), and a run SIGKILLed during its last step resumes from the step-2 checkpoint
and redoes step 3 exactly (policy, critic, both optimizers, every rank). The same runs hold what
test_train_cli's adapter runs hold for the placements they leave to these: the generator runs the learner's
weights exactly (adapter sync over the 2 ranks' ZeRO-3 partitions; dequantized NF4 base) and every policy
adapter matrix of the exported adapter trained.

    lora x 2 ranks, colocated    two processes, each a policy rank with its critic beside it, ZeRO-3
    qlora, distributed           4-bit NF4 bases, the critic its own learner actor

Four short steps each (a few minutes in all); the policy starts from builtin:tiny and VADER is the reward.
"""
from __future__ import annotations


import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

from helpers import SAME_AFTER_RESUME, kill_while_training, metrics, train  # noqa: E402  (tests/e2e is on the path)

COMMON = ("run.stages=[rl]", "rl.init_from=builtin:tiny", "algorithm.name=ppo", "model.lora.enabled=true",
          "reward.sources=[{kind: function, path: 'rlhf_ray.data.builtin_reviews:vader_reward'}]",
          "rl.policy.optim.lr=2e-3", "rl.critic.optim.lr=2e-3", "rl.steps=4", "rl.save_every=2",
          "rl.sample_every=0", "logging.report=false", "logging.tensorboard=false")
VARIANTS = {
    "lora-2ranks-colocated": ("cluster.placement=colocated", "rl.policy.num_ranks=2",
                              "rl.policy.deepspeed.zero_stage=3", "rl.critic.deepspeed.zero_stage=3"),
    "qlora-distributed": ("cluster.placement=distributed", "model.quantization.load_in_4bit=true"),
}
SAME = (*SAME_AFTER_RESUME, "value/loss", "value/objective", "value/grad_norm", "value/clip_frac")


def critic_lora_b(ckpt, zero3: bool) -> dict[str, torch.Tensor]:
    """The critic's LoRA B matrices as its checkpoint holds them: ZeRO-0 keeps the module's weights in one
    file; ZeRO-3 keeps each rank's fp32 partition in its optimizer state (DeepSpeed's own reader joins them)."""
    if zero3:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt / "critic"), tag="state")
    else:
        state = torch.load(ckpt / "critic" / "state" / "mp_rank_00_model_states.pt", map_location="cpu",
                           weights_only=True)["module"]
    return {k: v for k, v in state.items() if "lora_B" in k}


# LoRA on two colocated ZeRO-3 ranks is the long tier's (`make test` kills and resumes adapters in the QLoRA
# case, full weights under the colocated placement in test_train_cli.py, and two ranks update as one in
# roles/test_ranks_token_mean.py)
@pytest.mark.parametrize("variant", [pytest.param(v, marks=pytest.mark.long) if v == "lora-2ranks-colocated" else v
                                     for v in sorted(VARIANTS)])
def test_ppo_critic_trains_under_lora_and_qlora_and_a_killed_run_resumes_exactly(tmp_path, variant):
    out = tmp_path / variant
    args = [f"run.output_dir={out}", *COMMON, *VARIANTS[variant]]
    before = kill_while_training(args, out, step=3)
    assert [r["step"] for r in before] == [1, 2, 3]
    ckpt = out / "rl" / "checkpoints" / "step_000002"
    assert (ckpt / "policy" / "COMPLETE").is_file() and (ckpt / "critic" / "COMPLETE").is_file()
    zero3 = not variant.startswith("qlora")
    if zero3:  # ZeRO-3 over 2 ranks: each rank saved its own partition of the critic's optimizer state
        assert len(list((ckpt / "critic" / "state").glob("*zero_pp_rank_*optim_states.pt"))) == 2
    # LoRA B starts at 0: after 2 updates every critic adapter matrix has moved by more than one optimizer
    # step's worth (lr 2e-3), on every rank's partition alike
    critic_b = critic_lora_b(ckpt, zero3)
    assert critic_b and min(float(v.abs().max()) for v in critic_b.values()) > 2e-3, "the critic did not train"

    resumed = train(*args, "--resume")
    assert "at step 2" in resumed.stdout and "step_000002" in resumed.stdout  # resumed, not restarted
    again = metrics(out / "rl")
    assert [r["step"] for r in again] == [1, 2, 3, 4] and again[:2] == before[:2]  # every step logged once
    for key in SAME:  # step 3 again: the policy, the critic, their optimizers and the rollout seeds came back
        assert again[2][key] == pytest.approx(before[2][key], rel=1e-4, abs=1e-6), key
    assert (out / "rl" / "model" / "COMPLETE").is_file() and (out / "rl" / "adapter").is_dir()
    gaps = [r["sync/logprob_max_abs"] for r in before + again if "sync/logprob_max_abs" in r]
    assert gaps and max(gaps) < 1e-3, gaps  # the generator runs the learner's weights, before and after resume
    adapter = load_file(out / "rl" / "adapter" / "adapter_model.safetensors")
    policy_b = [v for k, v in adapter.items() if "lora_B" in k]
    # LoRA B starts at 0: every exported policy adapter matrix took more than one optimizer step (lr 2e-3)
    assert policy_b and min(float(v.abs().max()) for v in policy_b) > 2e-3, "a policy adapter matrix did not train"
