"""Asynchronous RL with partial rollouts through the real CLI (rollout.mode=async, rollout.partial=true).

One colocated run from the session's SFT model against its reward model: the producer thread samples up to two
batches ahead in chunks of 6 tokens while the learner trains, weight pushes land between chunks, and the IS
correction weighs each token by its own sampler's log-prob. The run must finish every step, stay within the lag
bound, continue sequences past their first chunk, keep the engine exact where a batch is on-policy (step 1), and
learn. What a unit test cannot show: the real engine continues sequences from their tokens so far, and the
colocated rank's engine thread, learner thread and pushes interleave without a deadlock.
"""
import pytest

# The long tier's: `make test` proves the producer, the bound, drops, partial rollouts and resume with fake
# engines (rl/test_async.py) and a partial rollout on the real colocated engine (placement/test_colocated.py)
pytestmark = [pytest.mark.slow, pytest.mark.long]

from helpers import mean_of, metrics, train  # noqa: E402  (tests/e2e is on the path)

STEPS = 10


def test_async_partial_rollouts_stay_within_the_bound_and_learn(offline, tmp_path):
    out = tmp_path / "async"
    train(f"run.output_dir={out}", "run.stages=[rl]", f"rl.init_from={offline / 'sft' / 'model'}",
          f"reward.sources=[{{kind: model, path: '{offline / 'rm' / 'model'}'}}]", f"rl.steps={STEPS}",
          "rl.save_every=0", "rl.sample_every=0", "logging.report=false", "logging.tensorboard=false",
          "rollout.mode=async", "rollout.sync.max_off_policy_lag=2", "rollout.partial=true",
          "rollout.partial_chunk_tokens=6", "rollout.stop=[]")  # stop strings cannot span chunks (refused)
    rows = [r for r in metrics(out / "rl") if "reward/score_mean" in r]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert [r["sync/version"] for r in rows] == list(range(1, STEPS + 1))  # one push per step
    assert all(r["async/staleness_max"] <= 2 and r["async/dropped_batches"] == 0 for r in rows)
    # the engine continued every batch's sequences past their first 6-token chunk: without continuations no
    # response could be longer than 6 tokens (seen: 16-17 on average, the SFT model's reviews end with EOS)
    assert all(r["response/len_mean"] > 6 for r in rows), [r["response/len_mean"] for r in rows]
    # Whether a push lands inside a batch here is the machine's timing (the tiny model samples faster than it
    # trains, so the buffer is often full when the push comes: seen 0 and 64 rows across versions in two runs);
    # the mixed versions and their log-probs are rl/test_async.py's (scripted), not asserted here.
    assert all("async/rows_across_versions" in r for r in rows)
    assert any(r["async/staleness_mean"] > 0 for r in rows)
    # the first batch is sampled by the weights the learner starts from: there the engine is exact
    assert rows[0]["sync/lag"] == 0 and rows[0]["sync/logprob_max_abs"] < 1e-3
    assert all(0.5 < r["is/token_ratio_mean"] < 2.0 for r in rows)  # tis (auto with a lag) weighs stale tokens
    start, end = mean_of(rows, "reward/score_mean")  # seen: -0.36 -> 0.97 (first and last 3 steps)
    assert end > start + 0.5, f"reward did not rise clearly: {start:.3f} -> {end:.3f}"
    gold_start, gold_end = mean_of(rows, "reward/gold_mean")  # seen: 0.15 -> 0.48
    assert gold_end > gold_start + 0.1, f"VADER gold reward did not rise: {gold_start:.3f} -> {gold_end:.3f}"
    assert (out / "rl" / "model" / "model.safetensors").exists()
