"""End to end through the real CLI on a local Ray: SFT -> RM -> RL learns; a SIGKILLed run resumes exactly.

These tests start Ray, DeepSpeed and vLLM in subprocesses (minutes in all); they share one SFT + RM run.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
QUICK = str(ROOT / "configs" / "quickstart.yaml")


def train(*args, timeout=900, check=True):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    p = subprocess.run([sys.executable, "-m", "rlhf_ray.cli", "train", QUICK, *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"train failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return p


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]


def first_last(rows, key, k=3):
    vals = [r[key] for r in rows]
    return sum(vals[:k]) / k, sum(vals[-k:]) / k


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    """SFT and reward model of the quickstart, trained once for the module."""
    out = tmp_path_factory.mktemp("pipeline")
    train(f"run.output_dir={out}", "run.stages=[sft,rm]", "sft.epochs=1")
    rm_rows = metrics(out / "rm")
    assert rm_rows[-1]["eval/accuracy"] > 0.8
    return out


def rl_args(offline: Path, out: Path, *extra):
    return [f"run.output_dir={out}", "run.stages=[rl]", f"rl.init_from={offline / 'sft' / 'model'}",
            f"reward.sources=[{{kind: model, path: '{offline / 'rm' / 'model'}'}}]", *extra]


# Every RL behaviour below holds under both placements: all roles of a device in one process
# (colocated, the local default) and one Ray actor group per role (distributed, as on a cluster).
PLACEMENTS = ["colocated", "distributed"]


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_rl_raises_reward_with_bounded_kl(offline, tmp_path, algo, placement):
    out = tmp_path / algo
    train(*rl_args(offline, out, f"algorithm.name={algo}", "rl.steps=14", "rl.save_every=0",
                   f"cluster.placement={placement}"))
    rows = metrics(out / "rl")
    assert [r["step"] for r in rows] == list(range(1, 15))
    start, end = first_last(rows, "reward/score_mean")
    assert end > start + 1.0, f"reward did not rise clearly: {start:.3f} -> {end:.3f}"
    gold_start, gold_end = first_last(rows, "reward/gold_mean")
    assert gold_end > gold_start + 0.1, f"VADER gold reward did not rise: {gold_start:.3f} -> {gold_end:.3f}"
    assert max(r["kl/mean"] for r in rows) < 1.0
    assert max(r["sync/logprob_max_abs"] for r in rows) < 1e-3  # generator runs the learner's weights
    assert (out / "rl" / "model" / "config.json").exists() and (out / "rl" / "report.png").exists()
    if algo == "ppo":
        assert "value/loss" in rows[-1]


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_sigkill_then_resume_matches_an_uninterrupted_run(offline, tmp_path, placement):
    common = ("rl.steps=6", "rl.save_every=3", f"cluster.placement={placement}")
    ref_dir, cut_dir = tmp_path / "ref", tmp_path / "cut"
    train(*rl_args(offline, ref_dir, *common))

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "rlhf_ray.cli", "train", QUICK, *rl_args(offline, cut_dir, *common)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    log = cut_dir / "rl" / "metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline:  # kill after step 4 is logged: past the step-3 checkpoint
        if log.exists() and sum(1 for _ in log.open()) >= 4:
            break
        if proc.poll() is not None:
            pytest.fail("the run ended before it could be killed")
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and every Ray process it started
    proc.wait()
    assert not (cut_dir / "rl" / "model").exists()
    before = log.read_text().splitlines()

    resumed = train(*rl_args(offline, cut_dir, *common), "--resume")
    assert "at step 3" in resumed.stdout and "step_000003" in resumed.stdout  # it resumed, not restarted
    assert log.read_text().splitlines()[:3] == before[:3]  # steps before the checkpoint were kept, not redone
    ref, cut = metrics(ref_dir / "rl"), metrics(cut_dir / "rl")
    assert [r["step"] for r in cut] == [1, 2, 3, 4, 5, 6]  # every step logged exactly once
    for a, b in zip(ref, cut):
        for key in ("reward/score_mean", "kl/mean", "policy/loss", "response/len_mean"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)


@pytest.mark.parametrize("variant", [
    ("lora", ["model.lora.enabled=true", "rl.policy.optim.lr=2e-3"]),
    ("qlora", ["model.lora.enabled=true", "model.quantization.load_in_4bit=true", "rl.policy.optim.lr=2e-3"]),
    ("zero3x2", ["rl.policy.num_ranks=2", "rl.policy.deepspeed.zero_stage=3"]),
], ids=lambda v: v[0])
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_lora_qlora_and_two_rank_runs_keep_the_generator_exact(offline, tmp_path, variant, placement):
    name, extra = variant
    out = tmp_path / name
    train(*rl_args(offline, out, "rl.steps=3", "rl.save_every=0", f"cluster.placement={placement}", *extra))
    rows = metrics(out / "rl")
    assert len(rows) == 3
    # merged or adapter-only sync (LoRA), dequantized NF4 base (QLoRA), ZeRO-3 gathered sync (2 ranks): exact
    assert max(r["sync/logprob_max_abs"] for r in rows) < 1e-3
    assert (out / "rl" / "model" / "config.json").exists()
    if name != "zero3x2":
        assert (out / "rl" / "adapter" / "adapter_config.json").exists()
        assert rows[-1]["kl/mean"] != 0.0  # the adapter moved away from the reference (base, adapter off)
