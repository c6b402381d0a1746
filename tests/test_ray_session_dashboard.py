"""A local run starts Ray's dashboard only when a Ray Train stage needs it (its job and train state): an
RL-only run skips the dashboard's processes and about 3 s of every start."""
import contextlib
import tempfile
from pathlib import Path

import pytest

from rlhf_ray.config import load_config


TEMP = tempfile.gettempdir()


class Stop(Exception):
    pass


@pytest.mark.parametrize("stages,dashboard", [("[rl]", False), ("[sft,rm,rl]", True), ("[dpo]", True)])
def test_the_pipeline_asks_for_the_dashboard_only_with_a_ray_train_stage(monkeypatch, tmp_path, stages, dashboard):
    asked = []

    @contextlib.contextmanager
    def session(cluster, dashboard=True):
        asked.append(dashboard)
        raise Stop
        yield

    monkeypatch.setattr("rlhf_ray.runtime.ray_session", session)
    from rlhf_ray.pipeline import run_pipeline
    cfg = load_config("configs/quickstart.yaml", [f"run.stages={stages}", f"run.output_dir={tmp_path}",
                                                  "reward.sources=[{kind: function, path: 'rlhf_ray.data.builtin_reviews:vader_reward'}]"])
    with pytest.raises(Stop):
        run_pipeline(cfg)
    assert asked == [dashboard]


@pytest.mark.parametrize("dashboard", [True, False])
def test_a_local_session_starts_ray_with_the_dashboard_as_asked(monkeypatch, dashboard):
    import ray

    from rlhf_ray.config.schema import ClusterConfig
    from rlhf_ray.runtime import ray_session
    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    with ray_session(ClusterConfig(address="local"), dashboard=dashboard):
        pass
    assert [c["include_dashboard"] for c in calls] == [dashboard]


def test_a_local_sessions_daemons_keep_their_temp_files_in_a_folder_removed_after_shutdown(monkeypatch, tmp_path):
    """Ray's dashboard runs its modules from a multiprocessing forkserver whose /tmp/pymp-* folder outlived every
    local run with an offline stage: the daemons `ray.init` starts get a temp folder of the run's own, removed
    after `ray.shutdown`; Ray's own folder stays where TMPDIR put it, and the job's workers get TMPDIR back."""
    import os

    import ray

    from rlhf_ray.config.schema import ClusterConfig
    from rlhf_ray.runtime import DAEMONS_TEMP_PREFIX, daemons_temp_folder, ray_session
    env = {}
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / ("x" * 80)))  # the sockets below would not fit
    assert daemons_temp_folder(env) is None and env == {}
    tmp_path = Path(tempfile.mkdtemp(prefix="s", dir=TEMP))  # short: the run's temp folder (tests/run_scratch.py)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    seen = {}

    def init(**kw):
        seen.update(kw, tmpdir=os.environ["TMPDIR"])
        (tmp_path / os.environ["TMPDIR"] / "pymp-x").mkdir()  # what the dashboard's forkserver leaves

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    with ray_session(ClusterConfig(address="local"), dashboard=True):
        daemons = seen["tmpdir"]
        assert os.path.dirname(daemons) == str(tmp_path)
        assert os.path.basename(daemons).startswith(f"{DAEMONS_TEMP_PREFIX}{os.getpid()}_")
        assert os.environ["TMPDIR"] == str(tmp_path)                       # this process's own, as it was
        assert seen["_temp_dir"] == str(tmp_path / "ray")                  # Ray's session folder: where it was
        assert seen["runtime_env"]["env_vars"]["TMPDIR"] == str(tmp_path)  # every worker's, as it was
    assert sorted(p.name for p in tmp_path.iterdir()) == []                # the daemons' folder is gone
    tmp_path.rmdir()


def test_a_local_start_that_fails_removes_the_daemons_folder_and_stops_what_it_started(monkeypatch):
    """`ray.init` raising halfway (a port taken, a daemon that did not come up) left the daemons' temp folder
    behind until the next run on the machine, and did not stop the daemons already started."""
    import os

    import ray

    from rlhf_ray.config.schema import ClusterConfig
    from rlhf_ray.runtime import ray_session
    tmp_path = Path(tempfile.mkdtemp(prefix="s", dir=TEMP))
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    stopped = []

    def init(**kw):
        (Path(os.environ["TMPDIR"]) / "pymp-x").mkdir()  # a daemon came up and left its file
        raise ConnectionError("the GCS did not come up")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "shutdown", lambda: stopped.append(True))
    with pytest.raises(ConnectionError):
        with ray_session(ClusterConfig(address="local"), dashboard=False):
            pass
    assert stopped == [True]
    assert list(tmp_path.iterdir()) == []
    tmp_path.rmdir()
