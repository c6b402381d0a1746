"""End to end through the real CLI on a local Ray: SFT -> RM -> RL learns; a SIGKILLed run resumes exactly;
PPO's full update (minibatches x epochs, KL loss, adaptive KL, entropy) and its resume; LoRA / QLoRA runs;
stage skipping and SFT/RM resume; overlap mode scoring through the HTTP reward service.

These tests start Ray, DeepSpeed and vLLM in subprocesses (minutes in all); they read the session's one SFT + RM
run (conftest.py `offline`), and the two PPO tests share one PPO run.
"""
import json
import math
import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

# tests/e2e is on the path
from helpers import (OFFLINE_SAVES, SAME_AFTER_RESUME, assert_learned_on_held_out_prompts,  # noqa: E402
                     assert_quiet_console, assert_the_kl_regularised_objective_rose, sigterm_while_training,
                     mean_of, metrics, serve, stop_process, train)

from rlhf_ray.utils.device import LOGPROB_TOLERANCE, cpu_has_fast_bf16  # noqa: E402


def rows_at(rows, step):
    return [r for r in rows if r["step"] == step]


def rl_args(offline: Path, out: Path, *extra):
    return [f"run.output_dir={out}", "run.stages=[rl]", f"rl.init_from={offline / 'sft' / 'model'}",
            f"reward.sources=[{{kind: model, path: '{offline / 'rm' / 'model'}'}}]", *extra]


# Every RL behaviour below holds under both placements: all roles of a device in one process (colocated,
# the local default) and one Ray actor group per role (distributed, as on a cluster).
PLACEMENTS = ["colocated", "distributed"]


# PPO under the colocated placement learns in test_algorithms_cli.py (its critic from the reward model, an
# adaptive KL), with the same held-out, exact-generator and export checks.
# GRPO under the distributed placement is judged on held-out prompts in test_lag_epochs.py's distributed run
# (one step behind, two ZeRO-3 ranks), which is GRPO on the same task.
# PPO under the distributed placement is the long tier's: PPO learns on held-out prompts in `make test` in
# test_algorithms_cli.py (colocated), and runs distributed there in test_ppo_adapters_resume.py's QLoRA case
@pytest.mark.parametrize("algo,placement", [("grpo", "colocated"),
                                            pytest.param("ppo", "distributed", marks=pytest.mark.long)])
def test_rl_raises_reward_with_bounded_kl(offline, tmp_path, algo, placement):
    """14 steps from the session's SFT model against its reward model: the reward rises on the training prompts
    and on held-out ones (judged by the reward model and by VADER), the KL stays bounded by what it bought, and
    the generator runs the learner's weights. The colocated GRPO run is also stopped by SIGTERM (to the driver
    alone, as a scheduler or `kill` stops it) while it trains step 5 (checkpoint at step 3, step 4 logged): exit
    143, one line naming the stage, the step and the checkpoint --resume continues from, no Ray stack dump, no
    process of the run left. `--resume` then starts from the step-3 checkpoint, keeps the steps before it, redoes
    step 4 exactly as before the stop (policy, optimizer, prompt position, sampling seeds) and finishes, every
    step logged once; the learning above is then judged on the resumed run. (A SIGKILL and the same exact redo:
    test_faults.py's killed learner, full weights, and test_ppo_adapters_resume.py's QLoRA run, adapters, both
    distributed; colocated, that file's LoRA run in the long tier. Ctrl-C to the whole process group and a
    finished stage continued: the long tier's test_signals_cli.py.)"""
    out = tmp_path / algo
    killed = (algo, placement) == ("grpo", "colocated")
    args = rl_args(offline, out, f"algorithm.name={algo}", "rl.steps=14", f"cluster.placement={placement}",
                   "rl.eval_every=7", "data.rl_eval_prompts=24", "rl.eval_samples=2",
                   "rl.save_every=3" if killed else "rl.save_every=0")
    if killed:
        before, said = sigterm_while_training(args, out, step=4)
        assert len(before) < 14
        lines = [x for x in said.splitlines() if x.strip()]
        assert len(lines) == 1 and lines[0].startswith(f"rlhf-ray: stopped by SIGTERM in stage rl after step "
                                                       f"{before[-1]['step']}; rerun with --resume to continue rl "
                                                       f"from its checkpoint of step "), said[-3000:]
        ckpt = int(lines[0].rsplit(" ", 1)[1])
        assert ckpt in (3, 6) and ckpt <= before[-1]["step"], lines[0]  # the last save every 3 steps
        p = train(*args, "--resume")
        assert f"at step {ckpt}" in p.stdout and f"step_{ckpt:06d}" in p.stdout  # it resumed, not restarted
    else:
        p = train(*args)
    assert_quiet_console(p)
    all_rows = metrics(out / "rl")
    assert_learned_on_held_out_prompts(all_rows, [0, 7, 14])  # GRPO and PPO learn on held-out prompts
    rows = [r for r in all_rows if "reward/score_mean" in r]
    assert [r["step"] for r in rows] == list(range(1, 15))  # every step logged exactly once
    if killed:
        assert rows[:ckpt] == before[:ckpt]  # steps before the checkpoint were kept, not redone
        assert len(before) > ckpt, "no step after the checkpoint to redo"
        for key in SAME_AFTER_RESUME:  # the step after the checkpoint again: the same as before the stop
            assert rows[ckpt][key] == pytest.approx(before[ckpt][key], rel=1e-4, abs=1e-6), key
    start, end = mean_of(rows, "reward/score_mean")
    assert end > start + 1.0, f"reward did not rise clearly: {start:.3f} -> {end:.3f}"
    gold_start, gold_end = mean_of(rows, "reward/gold_mean")
    assert gold_end > gold_start + 0.1, f"VADER gold reward did not rise: {gold_start:.3f} -> {gold_end:.3f}"
    assert_the_kl_regularised_objective_rose(rows)  # the KL bounded by what it bought, on any CPU kind
    assert max(r["sync/logprob_max_abs"] for r in rows) < 1e-3  # generator runs the learner's weights
    assert (out / "rl" / "model" / "config.json").exists() and (out / "rl" / "report.png").exists()
    if algo == "ppo":
        assert "value/loss" in rows[-1]


LORA = ("lora", ["model.lora.enabled=true", "rl.policy.optim.lr=2e-3"])
QLORA = ("qlora", ["model.lora.enabled=true", "model.quantization.load_in_4bit=true", "rl.policy.optim.lr=2e-3"])


# LoRA under the colocated placement and QLoRA under the distributed one run in test_ppo_adapters_resume.py
# (PPO, policy and critic adapters, killed and resumed), which asserts the same exact generator and trained
# adapter; the other two cases run here. Two policy ranks with ZeRO-3 (full weights) run in
# test_lag_epochs.py, under both placements.
# LoRA under the distributed placement is the long tier's (adapters travel to a distributed generator in
# `make test` in test_ppo_adapters_resume.py's QLoRA case)
@pytest.mark.parametrize("variant,placement", [pytest.param(LORA, "distributed", marks=pytest.mark.long),
                                               (QLORA, "colocated")],
                         ids=["lora-distributed", "qlora-colocated"])
def test_lora_and_qlora_runs_keep_the_generator_exact_and_train_the_adapter(offline, tmp_path, variant, placement):
    from safetensors.torch import load_file
    name, extra = variant
    out = tmp_path / name
    args = rl_args(offline, out, "rl.steps=3", "rl.save_every=0", f"cluster.placement={placement}", *extra)
    assert_quiet_console(train(*args))  # QLoRA: bitsandbytes' kernel line stays silent too
    rows = metrics(out / "rl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    # merged or adapter-only sync (LoRA), dequantized NF4 base (QLoRA): exact
    assert max(r["sync/logprob_max_abs"] for r in rows) < 1e-3
    # The exported policy is not its starting point: Adam moves a weight by about lr per step, so 3 updates
    # move some weight by more than one step's worth.
    lr = 2e-3
    exported = load_file(out / "rl" / "model" / "model.safetensors")
    init = load_file(offline / "sft" / "model" / "model.safetensors")
    moved = max(float((exported[k] - init[k]).abs().max()) for k in init)
    assert moved > lr, f"the exported policy is (nearly) its starting point (max change {moved:.2e})"
    assert (out / "rl" / "adapter" / "adapter_config.json").exists()
    adapter = load_file(out / "rl" / "adapter" / "adapter_model.safetensors")
    b_mats = [v for k, v in adapter.items() if "lora_B" in k]
    # LoRA B starts at 0: every adapter matrix took more than one optimizer step's worth (about lr)
    assert b_mats and min(float(v.abs().max()) for v in b_mats) > lr, "an adapter matrix did not train"



# -- one PPO run that exercises most of the update: several minibatches x 2 epochs (so ratios leave 1 and
# clipping happens), the KL as a loss term with an adaptive coefficient, an entropy bonus, and a checkpoint
# every step (rotation). Its checkpoints then serve a resume that must redo step 4 exactly.
PPO = ("algorithm.name=ppo", "algorithm.ppo_epochs=2", "algorithm.mini_batch_size=16",
       "rl.policy.micro_batch_size=16", "rl.critic.micro_batch_size=16",
       "reference.kl_in_reward=false", "reference.kl_kind=k3", "algorithm.entropy_coef=0.01",
       "reference.adaptive_kl=true", "reference.kl_coef=0.02", "reference.kl_target=0.5", "reference.kl_horizon=100",
       "rl.steps=4", "rl.save_every=1")
BATCH = 8 * 8  # quickstart: 8 prompts x 8 samples per step


@pytest.fixture(scope="module")
def ppo_run(offline, tmp_path_factory):
    out = tmp_path_factory.mktemp("ppo")
    train(*rl_args(offline, out, *PPO))
    return out, metrics(out / "rl")


def test_ppo_epochs_clip_and_the_kl_and_entropy_terms_enter_the_objective(ppo_run):
    out, rows = ppo_run
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    ckpts = out / "rl" / "checkpoints"  # saved at 1, 2, 3 and the last step, 4; the 2 newest kept
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_000003", "step_000004"]
    for sub in ("policy", "critic"):
        assert (ckpts / "step_000003" / sub / "COMPLETE").is_file()
    for r in rows:  # 4 minibatches x 2 epochs: after the first update the ratio moves and is clipped
        assert r["policy/clip_frac"] > 0.01 and r["policy/ratio_max"] > 1.2, r["step"]
        assert "value/loss" in r and r["value/objective"] == pytest.approx(0.5 * r["value/loss"], rel=1e-5)
    beta, last, reached = 0.02, None, False
    for r in rows:
        # The minimised objective is surrogate + beta * KL (as a loss, k3) - entropy_coef * entropy, with the
        # beta the adaptive controller held at that step (micro-batch = minibatch, so the means are exact).
        expected = r["policy/loss"] + beta * r["kl/loss"] - 0.01 * r["policy/entropy"]
        assert r["policy/objective"] == pytest.approx(expected, rel=1e-4, abs=1e-7), r["step"]
        # Ziegler's rule on the KL per sequence, beta *= exp(clip(KL / target - 1, +-0.2) * batch / horizon),
        # with the controller's anti-windup (rlhf_ray.algo.kl): beta holds until the KL first reaches the
        # target, and while the KL already moves towards it
        kl = r["kl/seq_mean"]
        reached = reached or kl >= 0.5
        if reached and not (last is not None and (kl - 0.5) * (kl - last) < 0):
            beta *= math.exp(min(max(kl / 0.5 - 1, -0.2), 0.2) * BATCH / 100)
        last = kl
        assert r["kl/coef"] == pytest.approx(beta, rel=1e-6), (r["step"], [x["kl/seq_mean"] for x in rows])
    assert rows[-1]["kl/loss"] > 0 and rows[-1]["kl/coef"] != rows[0]["kl/coef"]
    assert all(r["reward/seq_mean"] == pytest.approx(r["reward/score_mean"], rel=1e-5) for r in rows)  # no KL in reward


# The long tier's: `make test` checks this run's checkpoint rotation in the test above, redoes a killed PPO step
# exactly with the critic, both optimizers and the rollout seeds restored in test_ppo_adapters_resume.py's
# QLoRA case (distributed), and restores the adaptive KL controller's state in
# rl/test_controller.py::test_adaptive_kl_follows_the_measured_kl_and_survives_a_resume (fast tier)
@pytest.mark.long
def test_rl_checkpoints_rotate_and_a_ppo_run_resumes_with_critic_and_kl_state(ppo_run, offline):
    out, rows = ppo_run
    ckpts = out / "rl" / "checkpoints"
    # saved at 1, 2, 3 and the last step, 4; the 2 newest kept
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_000003", "step_000004"]
    for sub in ("policy", "critic"):
        assert (ckpts / "step_000003" / sub / "COMPLETE").is_file()
    for folder in ("model", "checkpoints/step_000004"):  # as if the run had been killed during step 4
        shutil.rmtree(out / "rl" / folder)
    resumed = train(*rl_args(offline, out, *PPO), "--resume")
    assert "at step 3" in resumed.stdout and "step_000003" in resumed.stdout
    again = metrics(out / "rl")
    assert [r["step"] for r in again] == [1, 2, 3, 4] and again[:3] == rows[:3]
    # critic weights and optimizer (value/*), policy optimizer, adaptive beta (kl/coef) all came back
    for key in SAME_AFTER_RESUME + ("value/loss", "value/objective", "value/grad_norm", "kl/coef", "kl/loss",
                                    "policy/clip_frac"):
        assert again[3][key] == pytest.approx(rows[3][key], rel=1e-4, abs=1e-6), key


@pytest.mark.long  # `make test`: a restarted worker group skips the finished SFT (test_offline_train.py), and
# --resume continues RL and the reward model from their checkpoints (test_signals_cli.py, test_offline_train.py)
def test_train_resume_skips_finished_stages_and_resumes_the_reward_model(offline, tmp_path):
    """The whole chain in one invocation (sft -> rm -> rl on `stage:rm`, as `make demo`), resumed: SFT is
    finished and skipped, the reward model resumes from its step-40 checkpoint, RL starts from both."""
    run = tmp_path / "run"
    shutil.copytree(offline, run)
    sft_before = (run / "sft" / "metrics.jsonl").read_text()
    sft_model = (run / "sft" / "model" / "model.safetensors").stat().st_mtime_ns
    rm_rows = metrics(run / "rm")
    shutil.rmtree(run / "rm" / "model")  # the reward model stage "was killed" after its step-40 checkpoint
    train(f"run.output_dir={run}", "run.stages=[sft,rm,rl]", "sft.epochs=1", *OFFLINE_SAVES, "rl.steps=2",
          "rl.save_every=0", "--resume")
    assert [r["step"] for r in metrics(run / "rl")] == [1, 2] and (run / "rl" / "model" / "COMPLETE").is_file()
    assert (run / "sft" / "metrics.jsonl").read_text() == sft_before  # finished: not run again
    assert (run / "sft" / "model" / "model.safetensors").stat().st_mtime_ns == sft_model
    again = metrics(run / "rm")
    assert rows_at(again, 40)[-1]["resumed_from_step"] == 40
    for step in (41, 50, 56):  # the steps after the checkpoint reproduce the uninterrupted run
        a, b = rows_at(rm_rows, step)[0], rows_at(again, step)[0]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), step
    assert again[-1]["eval/accuracy"] == pytest.approx(rm_rows[-1]["eval/accuracy"], abs=0.006)  # 1 of 200 rows
    assert [r["step"] for r in again if "loss" in r] == list(range(1, 57))  # each step logged once


# The long tier's: `make test` overlaps generation with the update in test_lag_epochs.py's distributed run, scores
# through an HTTP source against a local server in roles/test_reward.py, and batches a reward replica's
# concurrent requests on Ray Serve in serve/test_replica_batching.py
@pytest.mark.long
def test_overlapped_run_scores_through_the_http_reward_service(offline, tmp_path):
    """`serve --what reward` serves the trained reward model; an RL run with max_off_policy_lag=1 scores
    through it and overlaps generation with the update on every step but the lockstep ones."""
    from rlhf_ray.roles.reward import RewardScorer
    from rlhf_ray.config import RewardConfig, RewardSource
    rm = offline / "rm" / "model"
    proc, url = serve("reward", f"reward.sources=[{{kind: model, path: '{rm}'}}]", probe="/health", timeout=300)
    try:
        out = tmp_path / "http"
        train(f"run.output_dir={out}", "run.stages=[rl]", f"rl.init_from={offline / 'sft' / 'model'}",
              f"reward.sources=[{{kind: http, url: '{url}/score', timeout_s: 60}}]", "rl.steps=3",
              "rl.save_every=0", "rl.sample_every=1", "rollout.sync.max_off_policy_lag=1",
              "rollout.sync.check_every=2")
    finally:
        stop_process(proc)
    rows = metrics(out / "rl")
    # step 1 samples step 2 during its update (lag 1); step 2 is a lockstep step (2 % check_every == 0);
    # the last step starts nothing
    assert [r["sync/overlapped"] for r in rows] == [1, 0, 0]
    assert [r["sync/lag"] for r in rows] == [0, 1, 0]
    assert rows[0]["sync/logprob_max_abs"] < 1e-3 and rows[2]["sync/logprob_max_abs"] < 1e-3
    samples = [json.loads(x) for x in (out / "rl" / "samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == {1, 2, 3}
    local = RewardScorer(RewardConfig(sources=(RewardSource(kind="model", path=str(rm)),)))
    want, _ = local.score([s["prompt"] for s in samples], [s["response"] for s in samples])
    assert [s["score"] for s in samples] == pytest.approx(want, rel=1e-4, abs=1e-4)  # the service's scores


@pytest.mark.skipif(not cpu_has_fast_bf16(), reason="this CPU has no native bf16: emulated bf16 is far too slow "
                                                   "and not a path a run would take here")
def test_a_bf16_run_checks_agreement_at_bf16_thresholds_and_weighs_the_gap(offline, tmp_path):
    """bf16 learner, reference and vLLM engine (colocated): the agreement check runs at bf16's thresholds
    (LOGPROB_TOLERANCE) instead of stopping the run at fp32's, and truncated IS weighs the remaining gap."""
    out = tmp_path / "bf16"
    train(*rl_args(offline, out, "model.dtype=bfloat16", "algorithm.is_correction=tis", "rl.steps=3", "rl.save_every=0"))
    rows = metrics(out / "rl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    gap = [r["sync/logprob_max_abs"] for r in rows]
    bf16 = LOGPROB_TOLERANCE["bfloat16"]
    assert all(g < bf16[0] for g in gap) and max(gap) > 1e-3, gap  # bf16 (not fp32 noise), within its bound
    assert all(r["sync/logprob_mean_abs"] < bf16[1] for r in rows)
    assert all(r["is/token_ratio_mean"] != 1.0 and abs(r["is/token_ratio_mean"] - 1) < 0.1 for r in rows), rows
