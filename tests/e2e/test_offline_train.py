"""Offline stages on Ray Train, end to end: SIGKILL then resume for each stage (every step logged once, resumed
from a Ray Train checkpoint), SFT and the reward model through their own commands (`rlhf-ray sft`, `rlhf-ray rm`,
which resume by default), DPO through `train --resume` (that run then shows DPO learned the preferences); 2 ranks
per stage on a 2-node cluster.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from helpers import pipeline_record  # (tests/e2e is on the path)

from rlhf_ray.runtime import DAEMONS_TEMP_PREFIX

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
QUICK = str(ROOT / "configs" / "quickstart.yaml")
SMALL = ("data.num_samples=400", "logging.console=false", "cluster.torch_threads=1")
# (steps, checkpoint every) of a stage killed mid-way: a tiny step takes 20 ms, so a stage must be long enough
# that the kill lands while it trains (these tests poll the run folder every 0.2 s)
LONG = (160, 8)


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0",
            "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def train(*args, command="train", timeout=900):
    p = subprocess.run([sys.executable, "-m", "rlhf_ray.cli", command, QUICK, *args], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"train failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    return p


def rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def steps_logged(stage_dir: Path) -> list[int]:
    return [r["step"] for r in rows(stage_dir / "metrics.jsonl") if "loss" in r]


# the stage's own command (resumes by default); DPO's is `train` with `--resume` (test_dpo_... below)
COMMAND = {"sft": "sft", "rm": "rm"}


# The long tier's: `make test` SIGKILLs a whole run mid-stage and resumes it from a Ray Train checkpoint, each
# step once, in the DPO test below (the same helper and checkpoint path, through `train --resume`), and kills a
# stage's worker in the test after this one (Ray Train restarts it from the reward model's own checkpoint)
@pytest.mark.long
@pytest.mark.parametrize("stage", ["sft", "rm"])
def test_sigkill_then_resume_continues_from_the_last_checkpoint(tmp_path, stage):
    total, every = LONG
    args = [f"run.output_dir={tmp_path}", f"run.stages=[{stage}]", *SMALL, f"{stage}.batch_size=8",
            f"{stage}.epochs=8", f"{stage}.max_steps={total}", f"{stage}.save_every={every}", f"{stage}.eval_every=0"]
    _kill_then_resume(tmp_path, stage, args, COMMAND[stage])


def _kill_then_resume(tmp_path: Path, stage: str, args: list[str], command: str, *resume: str,
                      total: int = LONG[0]) -> None:
    """`command ARGS` SIGKILLed whole once Ray Train holds two checkpoints of `stage` and steps ran past them;
    then `command ARGS RESUME` finishes it: each step logged once, in order, resumed from a checkpoint. `total`:
    the stage's steps (ARGS says so too)."""
    every = LONG[1]
    proc = subprocess.Popen([sys.executable, "-m", "rlhf_ray.cli", command, QUICK, *args], cwd=ROOT, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    ray_train_run = tmp_path / f"quickstart-{stage}"  # <run.name>-<stage>: Ray Train's run folder
    deadline = time.time() + 600
    try:  # kill once Ray Train holds two checkpoints (so the first is surely registered) and steps ran past them
        while time.time() < deadline and proc.poll() is None:
            if len(list(ray_train_run.glob(f"{stage}-step_*"))) >= 2 and max(steps_logged(tmp_path / stage), default=0) > 2 * every:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the stage finished (or failed) before it could be killed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    # the worker (in Ray's own process group) may run on for a moment: it must not have finished the stage
    assert not (tmp_path / stage / "model" / "COMPLETE").exists(), "killed too late: the stage had finished"
    before = steps_logged(tmp_path / stage)
    assert before and max(before) < total

    train(*args, *resume, command=command)
    logged = rows(tmp_path / stage / "metrics.jsonl")
    assert steps_logged(tmp_path / stage) == list(range(1, total + 1))  # each step once, in order
    resumed = [r["resumed_from_step"] for r in logged if "resumed_from_step" in r]
    assert resumed[0] == 0 and resumed[-1] >= every and resumed[-1] % every == 0, resumed
    assert (tmp_path / stage / "model" / "COMPLETE").exists()


def test_a_killed_worker_is_restarted_and_resumes_its_stage_from_its_last_checkpoint(offline):
    """FailureConfig: SIGKILL the one Ray Train worker mid-stage; the same run restarts the worker group from
    Ray Train's last checkpoint and finishes, every step logged once. SFT and the reward model ask for the same
    workers, so they run in one Ray Train run, and the worker is killed during the second: the restarted group
    skips SFT (finished by this run: not trained again) and resumes the reward model from its own checkpoint.
    (A worker killed in a run's first stage takes the same path with nothing to skip.) The run is the session's
    SFT + reward-model pipeline (conftest.py `offline`, 1 failure allowed a stage), its worker killed once the
    reward model's first checkpoint (step 20 of 56) was registered; this test reads what that run did."""
    seen, every = pipeline_record(offline), 20  # e2e/helpers.py OFFLINE_SAVES
    assert isinstance(seen["killed"], int), seen["killed"]  # the worker's pid
    sft_model = offline / "sft" / "model" / "model.safetensors"
    assert sft_model.stat().st_mtime_ns == seen["sft_mtime_at_kill"]  # not trained again
    assert [r["resumed_from_step"] for r in rows(offline / "sft" / "metrics.jsonl") if "resumed_from_step" in r] == [0]
    assert steps_logged(offline / "sft") == list(range(1, 57))
    assert steps_logged(offline / "rm") == list(range(1, 57))
    resumed = [r["resumed_from_step"] for r in rows(offline / "rm" / "metrics.jsonl") if "resumed_from_step" in r]
    assert resumed[0] == 0 and resumed[-1] >= every and resumed[-1] % every == 0, resumed  # its own checkpoint
    assert (offline / "rm" / "model" / "COMPLETE").exists()


def _vader_of_samples(model_dir: Path, n_prompts: int = 128) -> float:
    """Mean VADER score of sampled first lines (the gold judge the preference pairs were built with)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_ray.data.builtin_reviews import make_prompt, vader_reward
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    rng = random.Random(123)
    prompts = [make_prompt(rng) for _ in range(n_prompts)]
    torch.manual_seed(0)
    enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left")
    out = model.generate(**enc, do_sample=True, max_new_tokens=24, pad_token_id=tok.pad_token_id)
    texts = [t.split("\n")[0] for t in tok.batch_decode(out[:, enc.input_ids.shape[1]:], skip_special_tokens=True)]
    return sum(vader_reward(prompts, texts)) / len(texts)


def test_dpo_killed_then_resumed_learns_the_preferences(offline, tmp_path, monkeypatch, request):
    """DPO from the session's SFT model (conftest.py `offline`), its reference that same model, SIGKILLed
    mid-stage and continued with `train --resume` (each step once, from a checkpoint); the resumed run learns
    the preferences: held-out accuracy and margin, and the VADER judge the pairs were built with prefers its
    samples to the SFT model's. All 160 steps: at 96 the held-out accuracy and margin passed but the VADER judge
    once scored the DPO model's samples below the SFT model's (0.007 vs 0.153, a clean-clone CI run)."""
    total, every = LONG
    # both runs' temp folder, of this test alone (what the killed one's daemons left, the next clears): beside the
    # suite's run folder, as Ray's session sockets under it must fit AF_UNIX's 107 bytes (one level deeper would not)
    temp = Path(tempfile.mkdtemp(prefix="rlhf_ray_dpo_", dir=os.path.dirname(tempfile.gettempdir())))
    request.addfinalizer(lambda: shutil.rmtree(temp, ignore_errors=True))
    monkeypatch.setenv("TMPDIR", str(temp))
    args = [f"run.output_dir={tmp_path}", "run.stages=[dpo]", f"dpo.init_from={offline / 'sft' / 'model'}",
            "logging.console=false", "cluster.torch_threads=1", "dpo.batch_size=16", "dpo.epochs=2",
            f"dpo.max_steps={total}", f"dpo.save_every={every}", f"dpo.eval_every={total // 2}",
            "dpo.learner.optim.lr=1e-3"]
    _kill_then_resume(tmp_path, "dpo", args, "train", "--resume", total=total)
    evals = [r for r in rows(tmp_path / "dpo" / "metrics.jsonl") if "eval/accuracy" in r]
    assert evals[-1]["eval/rows"] >= 100
    assert evals[-1]["eval/accuracy"] > 0.8, evals  # chance is 0.5 (and 0 at the start: policy == reference)
    assert evals[-1]["eval/margin"] > 0.5
    sft_gold, dpo_gold = _vader_of_samples(offline / "sft" / "model"), _vader_of_samples(tmp_path / "dpo" / "model")
    assert dpo_gold > sft_gold + 0.15, (sft_gold, dpo_gold)  # the chosen reviews are the more positive ones
    # Ray's dashboard (a Ray Train stage starts it) left a multiprocessing folder a run (runtime.py
    # `daemons_temp_folder`); Ray's own session folders stay where TMPDIR puts them
    assert not [p.name for p in temp.iterdir() if p.name.startswith(("pymp-", DAEMONS_TEMP_PREFIX))]
    assert (temp / "ray").is_dir()


@pytest.mark.long  # multi-node placement is in `make test` through placement/test_role_asks.py's cluster
def test_two_ranks_per_stage_on_a_two_node_cluster(tmp_path):
    """`rlhf-ray train` with stages sft, rm, dpo against a 2-node cluster: STRICT_SPREAD puts the two ranks of
    every stage on different nodes, the run folder is the shared storage both nodes write checkpoints to, and
    Ray's own train state (what its dashboard shows) lists one finished run per stage, all in the CLI's job."""
    import ray
    from ray.cluster_utils import Cluster
    from ray.train.v2._internal.state.state_actor import get_state_actor  # the dashboard's source (Ray 2.60)

    from rlhf_ray.cli import main
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    cluster.add_node(num_cpus=2)
    try:
        overrides = [f"run.output_dir={tmp_path}", "run.stages=[sft,rm,dpo]", *SMALL,
                     "cluster.placement_strategy=STRICT_SPREAD", f"cluster.address={cluster.address}"]
        for stage in ("sft", "rm", "dpo"):
            overrides += [f"{stage}.learner.num_ranks=2", f"{stage}.batch_size=8", f"{stage}.max_steps=6",
                          f"{stage}.save_every=3", f"{stage}.eval_every=3"]
        assert main(["train", QUICK, *overrides]) == 0
        ray.init(address=cluster.address)
        state = get_state_actor()
        assert state is not None, "Ray Train kept no run state (RAY_TRAIN_ENABLE_STATE_TRACKING)"
        runs = {r.name: r for r in ray.get(state.get_train_runs.remote()).values()}
        attempts = ray.get(state.get_train_run_attempts.remote())
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert sorted(runs) == ["quickstart-sft+rm+dpo"]
    assert {r.status.value for r in runs.values()} == {"FINISHED"}
    assert len({r.job_id for r in runs.values()}) == 1  # one Ray job: the CLI's driver
    # Ray Train's checkpoints of both ranks, named by their stage; num_to_keep=2 keeps the run's last two
    assert sorted(p.name for p in (tmp_path / "quickstart-sft+rm+dpo").glob("*-step_*")) == [
        "dpo-step_000003", "rm-step_000003"]
    for run in runs.values():
        last = max(attempts[run.id].values(), key=lambda a: a.start_time_ns)
        assert len({w.node_id for w in last.workers}) == 2, run.name  # 2 ranks, one per node
    for stage in ("sft", "rm", "dpo"):
        assert (tmp_path / stage / "model" / "COMPLETE").exists()
        assert steps_logged(tmp_path / stage) == list(range(1, 7))
        assert any("eval/loss" in r for r in rows(tmp_path / stage / "metrics.jsonl"))
