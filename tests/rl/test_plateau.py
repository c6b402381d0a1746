"""The plateau line and which config changes `--resume` accepts."""
import json

import pytest

from rlhf_ray.config import ConfigError, load_config
from rlhf_ray.rl.plateau import PlateauDetector, check_resume_overrides

WATCH = {"policy/clip_frac": 0.002, "kl/mean": 0.31, "policy/entropy": 1.7}


def _feed(det, rewards):
    return [(s, line) for s, r in enumerate(rewards, 1)
            if (line := det.update(s, {"reward/score_mean": r, **WATCH})) is not None]


def test_plateau_is_announced_once_with_signals_and_knobs():
    cfg = load_config(None, ["rl.plateau_window=4", "rl.plateau_smoothing=2", "algorithm.clip_high=0.2",
                             "reference.kl_coef=0.02"])
    lines = _feed(PlateauDetector(cfg), [0.0, 0.5, 1.0, 1.5, 1.5, 1.5, 1.5, 1.5, 1.5, 1.5, 1.5])
    assert len(lines) == 1
    step, line = lines[0]
    assert step == 9  # the 2-step average first reaches 1.5 at step 5, then 4 steps without a better one
    for needle in ("clip_frac 0.002", "kl 0.31", "entropy 1.7", "--resume", "algorithm.clip_high=0.28",
                   "reference.kl_coef=0.01", "algorithm.entropy_coef", "rl.policy.optim.lr"):
        assert needle in line, needle


def test_rising_reward_is_no_plateau_and_an_improvement_rearms_it():
    cfg = load_config(None, ["rl.plateau_window=3", "rl.plateau_smoothing=1"])
    assert _feed(PlateauDetector(cfg), [0.1 * i for i in range(20)]) == []
    lines = _feed(PlateauDetector(cfg), [1, 1, 1, 1, 2, 2, 2, 2])
    assert [s for s, _ in lines] == [4, 8]
    assert _feed(PlateauDetector(load_config(None, ["rl.plateau_window=0"])), [1.0] * 30) == []


def test_resume_accepts_safe_overrides_and_refuses_others_by_name(tmp_path):
    path = tmp_path / "run_config.json"
    start = load_config(None, [])
    assert check_resume_overrides(path, start, resume=False) == []
    assert json.loads(path.read_text())["algorithm"]["clip_high"] == 0.2
    safe = load_config(None, ["algorithm.clip_high=0.28", "reference.kl_coef=0.01", "rl.steps=60"])
    assert check_resume_overrides(path, safe, resume=True) == ["algorithm.clip_high", "reference.kl_coef",
                                                               "rl.steps"]
    with pytest.raises(ConfigError, match=r"--resume cannot change model.path, rl.policy.optim.lr.*optimizer"):
        check_resume_overrides(path, load_config(None, ["rl.policy.optim.lr=1e-3", "model.path=/x",
                                                        "algorithm.clip_high=0.28"]), resume=True)
    adaptive = load_config(None, ["reference.adaptive_kl=true", "algorithm.clip_high=0.28", "rl.steps=60"])
    check_resume_overrides(path, adaptive, resume=False)  # a fresh start records, never refuses
    with pytest.raises(ConfigError, match="cannot change reference.kl_coef.*adaptive_kl"):
        check_resume_overrides(path, load_config(None, ["reference.adaptive_kl=true", "reference.kl_coef=0.1",
                                                        "algorithm.clip_high=0.28", "rl.steps=60"]), resume=True)


def test_an_unsafe_resume_override_is_refused_by_preflight_before_any_stage_runs(tmp_path):
    """The refusal comes from `preflight` (before Ray starts and before the offline stages run again), and
    leaves the run's recorded config as it was."""
    from rlhf_ray.preflight import preflight
    start = load_config(None, [f"run.output_dir={tmp_path}", "run.stages=[rl]", "reward.sources=[{kind: function, path: 'rewards_for_tests:nan_reward'}]"])
    check_resume_overrides(tmp_path / "rl" / "run_config.json", start, resume=False)
    recorded = (tmp_path / "rl" / "run_config.json").read_text()
    changed = load_config(None, [f"run.output_dir={tmp_path}", "run.stages=[rl]", "reward.sources=[{kind: function, path: 'rewards_for_tests:nan_reward'}]",
                           "model.lora.enabled=true"])
    never = lambda spec: pytest.fail(f"preflight resolved {spec} before refusing the resume")  # noqa: E731
    with pytest.raises(ConfigError, match="--resume cannot change model.lora.enabled"):
        preflight(changed, resolve=never, resume=True)
    assert (tmp_path / "rl" / "run_config.json").read_text() == recorded
