"""Inputs a new user gets wrong, through the CLI: each ends in one line naming the key or the file and line,
exit 1, before Ray starts (cluster.address points at nothing: a run that got as far as Ray would fail there
instead, with another message). One case runs the console script as a user does; the rest call `main` in
this process (seconds instead of an interpreter and its imports each)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf_ray.cli import main

ROOT = Path(__file__).resolve().parents[1]
NO_RAY = "cluster.address=ray://127.0.0.1:1"
VADER = "reward.sources=[{kind: function, path: 'rlhf_ray.data.builtin_reviews:vader_reward'}]"


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    return subprocess.run([sys.executable, "-m", "rlhf_ray.cli", *args, NO_RAY], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def one_line(p: subprocess.CompletedProcess, *expected: str) -> str:
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    assert p.returncode == 1, p.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("rlhf-ray: error: "), p.stderr[-3000:]
    for e in expected:
        assert e in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def run_main(capsys):
    """`main(args)` in this process, as a CompletedProcess (its stderr is what the console would show)."""
    def run(*args: str) -> subprocess.CompletedProcess:
        code = main([*(a for a in args if not a.startswith("--")), NO_RAY, *(a for a in args if a.startswith("--"))])
        out = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out.out, out.err)
    return run


# -- run.output_dir --------------------------------------------------------------------------------
def test_output_dir_that_is_a_file_is_named(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("mine")
    one_line(cli("train", "configs/quickstart.yaml", f"run.output_dir={f}", "run.stages=[sft]"),
             "run.output_dir", str(f), "is a file, not a folder")
    assert f.read_text() == "mine"


def test_output_dir_below_a_file_is_named(tmp_path, run_main):
    f = tmp_path / "notes.txt"
    f.write_text("mine")
    one_line(run_main("train", "configs/quickstart.yaml", f"run.output_dir={f / 'run'}", "run.stages=[sft]"),
             "run.output_dir", f"{f} is a file")


def test_output_dir_that_cannot_be_created_is_named(run_main):
    # /proc takes no new folders, for root too (permission bits would not stop root)
    one_line(run_main("train", "configs/quickstart.yaml", "run.output_dir=/proc/rlhf_ray_nowhere/run", "run.stages=[sft]"),
             "run.output_dir: /proc/rlhf_ray_nowhere/run cannot be created or written in")


def test_offline_command_names_a_bad_output_dir_too(tmp_path, run_main):
    f = tmp_path / "notes.txt"
    f.write_text("mine")
    one_line(run_main("sft", "configs/quickstart.yaml", f"run.output_dir={f}"), "run.output_dir", "is a file")


# -- files that are not UTF-8 ----------------------------------------------------------------------
LATIN1 = '{"prompt": "caf\xe9 au lait"}\n'.encode("latin-1")


def test_prompts_file_not_utf8_names_file_and_line(tmp_path, run_main):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_bytes(b'{"prompt": "fine"}\n' + LATIN1)
    one_line(run_main("train", "configs/quickstart.yaml", f"run.output_dir={tmp_path / 'run'}", "run.stages=[rl]",
                 f"data.prompts={prompts}", VADER),
             f"{prompts}:2", "not valid UTF-8")


def test_preference_file_not_utf8_names_file_and_line(tmp_path, run_main):
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_bytes(b'{"prompt": "p", "chosen": "a", "rejected": "b"}\n'
                      + '{"prompt": "p", "chosen": "s\xfcper", "rejected": "b"}\n'.encode("latin-1"))
    one_line(run_main("rm", "configs/quickstart.yaml", f"run.output_dir={tmp_path / 'run'}", "rm.init_from=builtin:tiny",
                 f"data.preferences={prefs}"),
             f"{prefs}:2", "not valid UTF-8")


def test_config_file_not_utf8_is_one_line(tmp_path, run_main):
    cfg = tmp_path / "c.yaml"
    cfg.write_bytes(b"run:\n  name: caf\xe9\n")
    p = run_main("config", str(cfg))
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert p.stderr.strip().count("\n") == 0 and "not valid UTF-8 (line 2" in p.stderr, p.stderr


# -- torch's NUMA binding warning from vLLM's CPU worker ---------------------------------------------
NUMA = """
import sys
if sys.argv[1] == "role":
    from rlhf_ray.runtime import quiet_role_process
    quiet_role_process()  # what Ray runs first in each of our role processes, local Ray or a joined cluster
import torch
from vllm.platforms.cpu import CpuPlatform
CpuPlatform.import_kernels()
torch.ops._C.init_cpu_memory_env([0])  # what vLLM's CPU worker calls as it starts (v1/worker/cpu_worker.py)
print("bound", flush=True)
"""


@pytest.mark.slow  # imports vLLM's kernels in two subprocesses (about 6 s each)
def test_a_role_process_without_a_gpu_keeps_vllms_numa_warning_off_the_console():
    env = {k: v for k, v in os.environ.items() if k != "TORCH_CPP_LOG_LEVEL"}  # a job's env, as submit.sh gives
    plain, role = (subprocess.run([sys.executable, "-c", NUMA, kind], cwd=ROOT, env=env, capture_output=True,
                                  text=True, timeout=300) for kind in ("plain", "role"))
    assert plain.returncode == 0 and "NUMA binding" in plain.stderr, plain.stderr[-2000:]  # the source still warns
    assert role.returncode == 0 and "bound" in role.stdout, role.stderr[-2000:]
    assert "NUMA binding" not in role.stderr, role.stderr[-2000:]


def test_torchs_cpp_warnings_are_off_only_where_no_gpu_is_and_the_operator_did_not_ask(tmp_path, monkeypatch):
    from rlhf_ray import runtime
    monkeypatch.delenv("TORCH_CPP_LOG_LEVEL", raising=False)
    monkeypatch.setattr(runtime, "GPU_DEVICES", (str(tmp_path / "nvidiactl"),))
    runtime.quiet_role_process()
    assert os.environ["TORCH_CPP_LOG_LEVEL"] == "ERROR"
    monkeypatch.setenv("TORCH_CPP_LOG_LEVEL", "INFO")  # the operator's, to debug
    runtime.quiet_role_process()
    assert os.environ["TORCH_CPP_LOG_LEVEL"] == "INFO"
    monkeypatch.delenv("TORCH_CPP_LOG_LEVEL")
    (tmp_path / "nvidiactl").write_text("")  # a GPU machine keeps the C++ warnings (NCCL's)
    runtime.quiet_role_process()
    assert "TORCH_CPP_LOG_LEVEL" not in os.environ


# -- --resume of a finished RL stage with a larger rl.steps ------------------------------------------
RL = ["configs/quickstart.yaml", "run.stages=[rl]", "rl.init_from=builtin:tiny", VADER]


def finished_rl_stage(root: Path, steps: int, checkpoints: tuple[int, ...]) -> Path:
    """What a finished RL stage leaves: its model (marked complete), its recorded config, its checkpoints."""
    from rlhf_ray.config import load_config
    from rlhf_ray.learner.checkpoint import MARKER
    out = root / "rl"
    (out / "model").mkdir(parents=True)
    (out / "model" / MARKER).write_text("ok\n")
    cfg = load_config(RL[0], [*RL[1:], f"run.output_dir={root}", f"rl.steps={steps}"])
    (out / "run_config.json").write_text(json.dumps(cfg.model_dump(mode="json")))
    for step in checkpoints:
        (out / "checkpoints" / f"step_{step:06d}").mkdir(parents=True)
        (out / "checkpoints" / f"step_{step:06d}" / MARKER).write_text("ok\n")
    return out


def test_more_steps_for_a_finished_stage_without_its_last_checkpoint_is_refused_before_ray(tmp_path, run_main):
    finished_rl_stage(tmp_path, 2, checkpoints=(1,))
    one_line(run_main("train", *RL, f"run.output_dir={tmp_path}", "rl.steps=4", "--resume"),
             "rl.steps=4: the finished RL stage", "ran 2 steps and its latest checkpoint is step_000001",
             "rl.init_from=")


def test_a_finished_stage_continues_from_its_last_steps_checkpoint(tmp_path):
    from rlhf_ray.rl.checkpoint import continues_finished
    out = finished_rl_stage(tmp_path, 2, checkpoints=(1, 2))
    assert continues_finished(out, 4)
    assert not continues_finished(out, 2) and not continues_finished(out, 1)  # nothing more asked: done


# -- the line an interrupted run prints ------------------------------------------------------------
def test_the_stop_line_names_stage_step_and_what_resume_continues_from(tmp_path):
    import signal
    import time

    from rlhf_ray.config import load_config
    from rlhf_ray.learner.checkpoint import MARKER
    from rlhf_ray.pipeline import stopped_line
    since = time.time() - 1
    cfg = load_config(RL[0], [*RL[1:], f"run.output_dir={tmp_path}", "run.stages=[sft,rl]"])
    assert stopped_line(cfg, ("sft",), since, signal.SIGINT) == (
        "stopped by Ctrl-C (SIGINT) in stage sft before its first step; nothing is saved to resume from yet: "
        "rerun the same command to start again")
    (tmp_path / "sft" / "model").mkdir(parents=True)
    (tmp_path / "sft" / "model" / MARKER).write_text("ok\n")
    (tmp_path / "rl").mkdir()
    (tmp_path / "rl" / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3)))
    assert stopped_line(cfg, ("rl",), since, signal.SIGTERM) == (
        "stopped by SIGTERM in stage rl after step 3; rerun with --resume to keep the finished sft and start rl "
        "again (no checkpoint of it yet)")
    (tmp_path / "rl" / "checkpoints" / "step_000002").mkdir(parents=True)
    (tmp_path / "rl" / "checkpoints" / "step_000002" / MARKER).write_text("ok\n")
    assert stopped_line(cfg, ("rl",), since, signal.SIGINT).endswith(
        "after step 3; rerun with --resume to continue rl from its checkpoint of step 2")
