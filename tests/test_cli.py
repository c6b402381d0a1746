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


ENTRY = """
import atexit, sys, threading, time
from pathlib import Path
atexit.register(lambda: print("atexit ran", flush=True))
if sys.argv[1] == "thread":
    def work(path=Path(sys.argv[2])):
        time.sleep(3)  # longer than `config` takes: the thread is still working when main returns
        path.write_text("done")
    threading.Thread(target=work).start()
sys.argv = ["rlhf-ray", "config", "algorithm.name=ppo"]
from rlhf_ray.cli import entry
entry()
"""


def test_the_console_script_exits_with_mains_code_after_the_atexit_handlers():
    out = subprocess.run([sys.executable, "-c", ENTRY, "plain"], capture_output=True, text=True)
    assert out.returncode == 0 and "name: ppo" in out.stdout
    assert out.stdout.rstrip().endswith("atexit ran")  # flushed, after main's output


def test_the_console_script_waits_for_a_thread_still_working(tmp_path):
    out = subprocess.run([sys.executable, "-c", ENTRY, "thread", str(tmp_path / "f")], capture_output=True, text=True)
    assert out.returncode == 0 and "atexit ran" in out.stdout
    assert (tmp_path / "f").read_text() == "done"
