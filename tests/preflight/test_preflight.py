"""Preflight checks, in-process and without Ray: each bad input is one `PreflightError` naming it."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from rlhf_ray.config import load_config
from rlhf_ray.models.kit import resolve_model_path
from rlhf_ray.preflight import (PreflightError, check_lora_targets, check_model_folder, check_prompts,
                                check_reward_functions, lora_targets_missing, module_names, resume_wanted)

E2E = Path(__file__).resolve().parents[1] / "e2e"


@pytest.fixture(scope="module")
def tiny() -> str:
    return resolve_model_path("builtin:tiny")


def cfg(*overrides):
    return load_config(None, ["run.stages=[rl]", "reward.sources=[{kind: function, path: 'rewards_for_tests:nan_reward'}]",
                              *overrides])


def test_lora_targets_match_like_peft():
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj", "lm_head"]
    assert lora_targets_missing(names, ("q_proj", "up_proj", "lm_head")) == []
    assert lora_targets_missing(names, ("q_proj", "proj", "qkv")) == ["proj", "qkv"]  # suffix of a name part only
    assert lora_targets_missing(names, ("all-linear",)) == []


def test_module_names_come_from_config_alone(tiny, tmp_path):
    (tmp_path / "config.json").write_text((Path(tiny) / "config.json").read_text())  # no weights at all
    names = module_names(str(tmp_path))
    assert "model.layers.0.self_attn.q_proj" in names and "lm_head" in names
    check_lora_targets(str(tmp_path), ("q_proj", "v_proj"))
    with pytest.raises(PreflightError, match=r"target_modules: c_attn not in the model .* q_proj"):
        check_lora_targets(str(tmp_path), ("q_proj", "c_attn"))


@pytest.mark.parametrize("setup,expected", [
    (lambda d: None, "holds no model \\(no config.json\\)"),
    (lambda d: (d / "config.json").write_text('{"model_type": "llama"'), "not valid JSON"),
    (lambda d: (d / "config.json").write_text('{"model_type": "nope"}'), "model_type 'nope'"),
    (lambda d: (d / "config.json").write_text('{"model_type": "x", "auto_map": {"AutoModel": "m.M"}}'),
     "its own Python code .*trust_remote_code off"),
    (lambda d: (d / "config.json").write_text('{"model_type": "llama"}'), "config.json but no weights"),
])
def test_model_folder_problems_are_named(tmp_path, setup, expected):
    folder = tmp_path / "m"
    folder.mkdir()
    setup(folder)
    with pytest.raises(PreflightError, match=f"model.path: .*{expected}"):
        check_model_folder(str(folder), "model.path")


def test_folder_without_tokenizer_is_named(tiny, tmp_path):
    for f in ("config.json", "model.safetensors"):
        (tmp_path / f).write_bytes((Path(tiny) / f).read_bytes())
    with pytest.raises(PreflightError, match="holds no tokenizer"):
        check_model_folder(str(tmp_path), "rl.init_from")
    check_model_folder(tiny, "model.path")  # the real thing passes


def test_prompt_count_against_the_batch(tiny):
    assert len(check_prompts(cfg("data.num_samples=50", "rl.prompts_per_step=8"), tiny)) >= 8
    with pytest.raises(PreflightError, match=r"rl.prompts_per_step=64 is more than the \d+ prompts"):
        check_prompts(cfg("data.num_samples=20", "rl.prompts_per_step=64"), tiny)


@pytest.mark.parametrize("name,expected", [
    ("nope", "cannot be imported"), ("raising_reward", "raised ValueError"),
    ("string_reward", "returned str 'good'"), ("short_reward", "returned 1 scores for 2"),
])
def test_reward_probe(monkeypatch, name, expected):
    monkeypatch.syspath_prepend(str(E2E))
    c = cfg(f"reward.sources=[{{kind: function, path: 'rewards_for_tests:{name}'}}]")
    with pytest.raises(PreflightError, match=f"reward.sources\\[0\\].path: .*{expected}") as info:
        check_reward_functions(c, ["a", "b"])
    if name == "raising_reward":  # the user's frames ride along, ours do not
        assert "rewards_for_tests.py" in info.value.detail and "rlhf_ray" not in info.value.detail


def test_nonfinite_probe_only_fails_when_nonfinite_is_an_error(monkeypatch):
    monkeypatch.syspath_prepend(str(E2E))
    import rewards_for_tests
    monkeypatch.setattr(rewards_for_tests, "nan_reward", lambda p, r: [float("nan")] * len(r))
    with pytest.raises(PreflightError, match="returned nan"):
        check_reward_functions(cfg(), ["a", "b"])
    check_reward_functions(cfg("reward.on_nonfinite=drop_group"), ["a", "b"])


def test_resume_modes(tmp_path):
    c = cfg(f"run.output_dir={tmp_path}")
    assert resume_wanted(c, None) is False
    assert resume_wanted(c, "auto") is False  # nothing there: start fresh
    with pytest.raises(PreflightError, match="--resume: nothing to resume"):
        resume_wanted(c, "required")
    step = tmp_path / "rl" / "checkpoints" / "step_000003"
    step.mkdir(parents=True)
    assert resume_wanted(c, "auto") is False  # incomplete: not a resume point
    (step / "COMPLETE").write_text("ok\n")
    assert resume_wanted(c, "required") is True and resume_wanted(c, "auto") is True


def test_a_checkpoint_in_the_shared_run_of_sft_and_rm_is_a_resume_point(tmp_path):
    c = cfg(f"run.output_dir={tmp_path}", "run.stages=[sft,rm]")  # same workers: one Ray Train run
    assert resume_wanted(c, "auto") is False
    (tmp_path / "run-sft+rm" / "rm-step_000004").mkdir(parents=True)
    assert resume_wanted(c, "required") is True
    assert resume_wanted(cfg(f"run.output_dir={tmp_path}", "run.stages=[sft,rm]", "rm.learner.num_ranks=2"),
                         "auto") is False  # different workers: runs of their own, which hold nothing


# Unpickling runs code named by the bytes: `pickle.load(f)` of a file and `pickle.loads(b)` of bytes off the
# network alike (the sync's bucket header once was `pickle.loads` of a broadcast), and their cloudpickle and
# `torch.load(weights_only=False)` spellings.
UNSAFE = re.compile(r"\b(?:c?pickle|cloudpickle|dill)\.loads?\s*\(|\bUnpickler\s*\(|weights_only\s*=\s*False"
                    r"|trust_remote_code\s*=\s*True")


def unsafe_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if UNSAFE.search(line)]


@pytest.mark.parametrize("line", ["specs = pickle.loads(meta.cpu().numpy().tobytes())", "x = pickle.load(f)",
                                  "cloudpickle.loads(raw)", "pickle.Unpickler(f).load()", "torch.load(p, weights_only=False)",
                                  "AutoModel.from_pretrained(p, trust_remote_code=True)"])
def test_the_unpickling_grep_catches_each_spelling(line):
    assert unsafe_lines(f"a = 1\n    {line}\n") == [line]


def test_no_file_is_unpickled_and_no_remote_code_is_trusted():
    root = Path(__file__).resolve().parents[2] / "rlhf_ray"
    found = {str(path.relative_to(root)): bad for path in root.rglob("*.py") if (bad := unsafe_lines(path.read_text()))}
    assert found == {}


def test_a_config_that_cannot_be_placed_is_refused_by_the_preflight_naming_the_role():
    """Config validation places nothing (tests/config/test_load.py); the CLI's preflight places the RL roles on the
    declared cluster, before Ray starts, and `rlhf-ray train` / `config` stop there in one line."""
    from rlhf_ray.cli import main
    from rlhf_ray.placement.plan import PlanError
    from rlhf_ray.preflight import check_plan, preflight
    gpu = ["cluster.device=cuda", "cluster.gpus_per_node=1", "rl.policy.gpus_per_rank=1", "rollout.gpus_per_engine=1",
           "cluster.placement=distributed"]
    bad = cfg(*gpu)
    with pytest.raises(PlanError, match=r"generator #0 asks for 1 GPU\(s\)"):
        check_plan(bad)
    with pytest.raises(PlanError, match=r"generator #0 asks for 1 GPU\(s\)"):
        preflight(bad)
    check_plan(cfg(*gpu[:-1], "cluster.gpus_per_node=2"))  # two GPUs hold both
    with pytest.raises(PlanError, match="rollout.tensor_parallel_size must be 1, got 2"):  # the plan's rule alone
        check_plan(cfg("rollout.tensor_parallel_size=2"))
    assert main(["config", "run.stages=[rl]", "reward.sources=[{kind: function, path: 'm:f'}]", *gpu]) == 1
