import pytest

from rlhf_ray.config import Config, ConfigError, load_config
from rlhf_ray.config.load import apply_override


def test_defaults_validate_and_are_frozen():
    cfg = load_config()
    assert isinstance(cfg, Config)
    with pytest.raises(Exception):
        cfg.rollout.temperature = 0.5


def test_overrides_keep_yaml_types():
    cfg = load_config(None, ["rollout.temperature=0.7", "model.lora.enabled=true", "rollout.stop=[a, b]",
                             "rollout.seed=null", "algorithm.name=rloo"])
    assert cfg.rollout.temperature == 0.7
    assert cfg.model.lora.enabled is True
    assert cfg.rollout.stop == ("a", "b")
    assert cfg.rollout.seed is None
    assert cfg.algorithm.name == "rloo"


def test_yaml_then_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("rollout:\n  temperature: 0.5\n  max_new_tokens: 7\n")
    cfg = load_config(p, ["rollout.temperature=0.9"])
    assert (cfg.rollout.temperature, cfg.rollout.max_new_tokens) == (0.9, 7)


@pytest.mark.parametrize("overrides, expected", [
    (["model.lorra.r=3"], "model.lorra: unknown key 'lorra'; did you mean 'lora'?"),
    (["rollout.temprature=1"], "did you mean 'temperature'?"),
    (["model.lora.r=0"], "model.lora.r: input should be greater than 0 (got 0)"),
    (["rollout.temperature=hot"], "rollout.temperature: input should be a valid number"),
    (["algorithm.name=grpp"], "algorithm.name: input should be 'ppo', 'grpo', 'dr_grpo', 'rloo', 'reinforce_pp', 'dapo', 'gspo' or 'cispo' (got 'grpp')"),
    (["model.lora.enabled=true", "model.quantization.load_in_4bit=true", "rl.policy.deepspeed.zero_stage=3"],
     "cannot be combined with rl.policy.deepspeed.zero_stage=3"),
    (["model.quantization.load_in_4bit=true"], "needs model.lora.enabled=true"),
    (["algorithm.name=grpo", "rollout.n_samples_per_prompt=1", "algorithm.mini_batch_size=8"],
     "needs rollout.n_samples_per_prompt >= 2"),
    (["algorithm.mini_batch_size=7"], "must divide the rollout batch"),
    (["rollout.sync.mode=adapter"], "needs model.lora.enabled=true"),
    (["reward.sources=[{kind: function, path: nocolon}]"], "module:function"),
    (["run.stages=[rl]"], "has no 'rm' stage"),
])
def test_bad_configs_name_the_problem(overrides, expected):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert expected in str(e.value)
    assert "\n" not in str(e.value)  # one paragraph


def test_validation_does_not_run_the_planner(monkeypatch):
    """The plan reads the config, not the other way round (a config that cannot be placed is the CLI's preflight's
    to refuse: tests/preflight/test_preflight.py): validating a config places nothing."""
    import rlhf_ray.placement.plan as plan

    def refuse(*args, **kwargs):
        raise AssertionError("config validation called the planner")
    monkeypatch.setattr(plan, "place", refuse)
    cfg = load_config(None, ["cluster.device=cuda", "cluster.gpus_per_node=1", "rl.policy.gpus_per_rank=1",
                             "rollout.gpus_per_engine=1", "cluster.placement=distributed"])
    assert cfg.cluster.placement == "distributed"


def test_several_problems_reported_at_once():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["model.lora.r=0", "rollout.top_p=2"])
    assert "2 problems" in str(e.value) and "model.lora.r" in str(e.value) and "rollout.top_p" in str(e.value)


@pytest.mark.parametrize("bad", ["novalue", "=3", "a..b=1"])
def test_malformed_override(bad):
    with pytest.raises(ConfigError):
        apply_override({}, bad)


def test_override_into_a_value_is_an_error():
    raw = {"rollout": {"temperature": 1.0}}
    with pytest.raises(ConfigError, match="rollout.temperature is a value"):
        apply_override(raw, "rollout.temperature.x=1")


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(lst)
