"""A local run starts Ray's dashboard only when a Ray Train stage needs it (its job and train state): an
RL-only run skips the dashboard's processes and about 3 s of every start."""
import contextlib

import pytest

from rlhf_ray.config import load_config


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
