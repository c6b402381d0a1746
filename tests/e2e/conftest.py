"""The end-to-end tests' one SFT + reward-model pipeline, trained once per test session and read by every test
that needs a trained policy or reward model (it was trained four times). Under pytest-xdist the first worker
to ask trains it under a file lock; the others wait and read the same folder.

The same run is where a killed Ray Train worker is restarted (FailureConfig): its one worker is SIGKILLed once
the reward model's first checkpoint is registered, and the run must still finish, the finished SFT skipped and
the reward model resumed from its own checkpoint (test_offline_train.py reads what happened; the resumed reward
model is the one every test reads, as a resume is exact: test_train_cli.py's long-tier resume of the reward
model reproduces the uninterrupted run's losses)."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import PIPELINE_ARGS, QUICK, ROOT, assert_quiet_console, metrics


@pytest.fixture(scope="session")
def offline(tmp_path_factory, worker_id):
    """The quickstart's SFT and reward model. The output folder is given relative to where the command runs, as
    `make demo`'s runs/quickstart: the reward model starts from the SFT stage's folder, which Ray Train's
    workers (in their own working directory) must still find."""
    from filelock import FileLock
    shared = tmp_path_factory.getbasetemp() if worker_id == "master" else tmp_path_factory.getbasetemp().parent
    out, done = shared / "pipeline", shared / "pipeline.json"
    with FileLock(str(shared / "pipeline.lock")):
        if not done.exists():
            done.write_text(json.dumps(_train_killing_its_worker_once(out)))
    console = json.loads(done.read_text())
    assert console["returncode"] == 0, f"the pipeline failed:\n{console['stdout'][-3000:]}\n{console['stderr'][-5000:]}"
    assert_quiet_console(type("Run", (), console))
    assert metrics(out / "rm")[-1]["eval/accuracy"] > 0.8
    return Path(out)


def _train_killing_its_worker_once(out: Path) -> dict:
    """`train run.stages=[sft,rm]` (one Ray Train run, 1 failure allowed); its one Ray Train worker SIGKILLed
    once the reward model's first checkpoint is registered. The kill is recorded, not asserted: a missed kill
    fails test_offline_train.py's test alone, not every test that reads the models."""
    import psutil
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    logs = {name: out.parent / f"pipeline.{name}" for name in ("stdout", "stderr")}
    with logs["stdout"].open("w") as so, logs["stderr"].open("w") as se:
        proc = subprocess.Popen([sys.executable, "-m", "rlhf_ray.cli", "train", QUICK,
                                 f"run.output_dir={os.path.relpath(out, ROOT)}", *PIPELINE_ARGS,
                                 "sft.max_failures=1", "rm.max_failures=1"],
                                cwd=ROOT, env=env, stdout=so, stderr=se, text=True, start_new_session=True)
    record: dict = {"killed": "the run ended before the reward model's first checkpoint was registered"}
    try:
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None:
            if _registered_checkpoint(out / "quickstart-sft+rm", "rm-step_"):
                sft_model = out / "sft" / "model" / "model.safetensors"
                record["sft_mtime_at_kill"] = sft_model.stat().st_mtime_ns if sft_model.exists() else None
                workers = [p for p in psutil.Process(proc.pid).children(recursive=True)
                           if "RayTrainWorker" in " ".join(p.cmdline())]
                if len(workers) != 1 or proc.poll() is not None:
                    record["killed"] = f"{len(workers)} Ray Train workers running at the kill, not 1"
                    break
                workers[0].kill()
                record["killed"] = workers[0].pid
                break
            time.sleep(0.05)
        proc.wait(timeout=max(deadline - time.time(), 1))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait()
    return {**record, "returncode": proc.returncode, **{k: f.read_text() for k, f in logs.items()}}


def _registered_checkpoint(run_dir: Path, name: str) -> bool:
    """Ray Train's controller has registered a checkpoint whose folder name holds `name`: a step folder alone
    is only the upload, and a worker killed before the controller's next poll restarts from scratch (CI saw
    that under load)."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    try:
        latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result")
    except (OSError, ValueError):
        return False
    return latest is not None and name in json.dumps(latest)


@pytest.fixture(scope="session")
def worker_id(request):
    """pytest-xdist's worker name ("gw0", ...), or "master" without it (its own fixture when installed)."""
    return getattr(request.config, "workerinput", {}).get("workerid", "master")
