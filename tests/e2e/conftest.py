"""The end-to-end tests' one SFT + reward-model pipeline, trained once per test session and read by every test
that needs a trained policy or reward model (it was trained four times). Under pytest-xdist the first worker
to ask trains it under a file lock; the others wait and read the same folder."""
import json
import os
from pathlib import Path

import pytest

from helpers import PIPELINE_ARGS, ROOT, assert_quiet_console, metrics, train


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
            p = train(f"run.output_dir={os.path.relpath(out, ROOT)}", *PIPELINE_ARGS)
            done.write_text(json.dumps({"stdout": p.stdout, "stderr": p.stderr}))
    console = json.loads(done.read_text())
    assert_quiet_console(type("Run", (), console))
    assert metrics(out / "rm")[-1]["eval/accuracy"] > 0.8
    return Path(out)


@pytest.fixture(scope="session")
def worker_id(request):
    """pytest-xdist's worker name ("gw0", ...), or "master" without it (its own fixture when installed)."""
    return getattr(request.config, "workerinput", {}).get("workerid", "master")
