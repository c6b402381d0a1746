"""Rollouts one step behind the learner while each step takes several optimizer steps, through the real CLI.

`rollout.sync.max_off_policy_lag=1` overlaps the next step's generation with this step's update, and
`algorithm.ppo_epochs=2` over minibatches of half the batch makes each update 4 optimizer steps. The weight
version counts pushes (one per RL step, `rlhf_ray.sync.weight_sync`), so an overlapped rollout lags by one
step. When the learner's version counted optimizer steps instead, these runs stopped at step 2 with
"StaleWeightsError: ... version 0 but the learner is at version 4". Both placements, from the session's SFT
model against its reward model; each run must finish, keep the generator exact on its lockstep steps, and
learn (the reward model's score and the VADER gold judge both rise).

The distributed run is also where GRPO's learning under that placement is judged on held-out prompts (as
test_train_cli.py judges it under the colocated one): the same run, evaluated before step 1, at step 5 and
after the last.

The policy trains on two ranks with ZeRO-3 (each rank a process of its own: under the colocated placement
each beside its own engine), so the same runs show the gathered full-weight sync of partitioned ranks
keeping the engines exact, and the two ranks' updates reaching the exported policy. That two ranks update
as one rank does, to float rounding, is roles/test_ranks_token_mean.py.
"""

import pytest

pytestmark = pytest.mark.slow

from helpers import (assert_learned_on_held_out_prompts, assert_the_kl_regularised_objective_rose,  # noqa: E402
                     mean_of, metrics, train)  # (tests/e2e is on the path)

STEPS = 10
ARGS = ("run.stages=[rl]", f"rl.steps={STEPS}", "rl.save_every=0", "rl.sample_every=0", "logging.report=false",
        "logging.tensorboard=false", "rollout.sync.max_off_policy_lag=1", "rollout.sync.check_every=4",
        # 8 prompts x 8 samples = 64 rows: 2 minibatches of 32, twice over
        "algorithm.ppo_epochs=2", "algorithm.mini_batch_size=32",
        "rl.policy.num_ranks=2", "rl.policy.deepspeed.zero_stage=3")


# the colocated run is the long tier's: the distributed one proves the same claim in `make test`, and the
# controller's version and lag bookkeeping is placement-free (rl/test_controller.py, with the product's WeightSync)
@pytest.mark.parametrize("placement", [pytest.param("colocated", marks=pytest.mark.long), "distributed"])
def test_one_step_lag_with_two_epochs_of_two_minibatches_runs_and_learns(offline, tmp_path, placement):
    out = tmp_path / placement
    held_out = ("rl.eval_every=5", "data.rl_eval_prompts=24", "rl.eval_samples=2") if placement == "distributed" else ()
    train(f"run.output_dir={out}", f"rl.init_from={offline / 'sft' / 'model'}",
          f"reward.sources=[{{kind: model, path: '{offline / 'rm' / 'model'}'}}]", *ARGS, *held_out,
          f"cluster.placement={placement}")
    all_rows = metrics(out / "rl")
    rows = [r for r in all_rows if "reward/score_mean" in r]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # every step ran, none stopped the run
    # one push per step: the versions count RL steps, and the overlapped rollouts are exactly one behind
    assert [r["sync/version"] for r in rows] == list(range(1, STEPS + 1))
    lags = [r["sync/lag"] for r in rows]
    assert set(lags) == {0, 1} and lags.count(1) >= STEPS // 2, lags
    # steps 1, 5 and 9 run in lockstep (check_every=4): there the generator runs the learner's weights exactly
    lockstep = [r["sync/logprob_max_abs"] for r in rows if r["sync/lag"] == 0]
    assert len(lockstep) >= 3 and max(lockstep) < 1e-3, lockstep
    assert all(0.5 < r["is/token_ratio_mean"] < 2.0 for r in rows)  # TIS (on with a lag) weighs the lagged tokens
    start, end = mean_of(rows, "reward/score_mean")
    assert end > start + 1.0, f"reward did not rise clearly: {start:.3f} -> {end:.3f}"
    gold_start, gold_end = mean_of(rows, "reward/gold_mean")
    assert gold_end > gold_start + 0.1, f"VADER gold reward did not rise: {gold_start:.3f} -> {gold_end:.3f}"
    assert_the_kl_regularised_objective_rose(rows)  # the KL bounded by what it bought
    if held_out:
        assert_learned_on_held_out_prompts(all_rows, [0, 5, STEPS])  # GRPO learns under this placement too
    # the exported policy left its starting point by more than one optimizer step's worth (about lr)
    from safetensors.torch import load_file
    exported = load_file(out / "rl" / "model" / "model.safetensors")
    init = load_file(offline / "sft" / "model" / "model.safetensors")
    assert max(float((exported[k] - init[k]).abs().max()) for k in init) > 5e-4
