import subprocess
import sys

from rlhf_ray.cli import main


def run(*args):
    return subprocess.run([sys.executable, "-m", "rlhf_ray.cli", *args], capture_output=True, text=True)


def test_help_lists_commands():
    out = run("--help")
    assert out.returncode == 0
    assert "config" in out.stdout and "models" in out.stdout and "examples:" in out.stdout


def test_config_prints_resolved_yaml_with_overrides(capsys):
    assert main(["config", "configs/quickstart.yaml", "rollout.temperature=0.5"]) == 0
    out = capsys.readouterr().out
    assert "temperature: 0.5" in out and "kl_coef" in out  # defaults filled in


def test_config_with_only_overrides(capsys):
    assert main(["config", "algorithm.name=ppo"]) == 0
    assert "name: ppo" in capsys.readouterr().out


def test_bad_config_is_one_paragraph_without_traceback():
    out = run("config", "configs/quickstart.yaml", "model.lora.rank=4")
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert "unknown key 'rank'" in out.stderr and "did you mean 'r'" in out.stderr
    assert out.stderr.strip().count("\n") == 0
