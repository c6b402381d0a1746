"""Stopping `rlhf-ray train` as an operator does, through the real CLI on a local Ray:

    Ctrl-C (SIGINT to the whole process group, as a terminal sends it)   one line: stage, last step, what
    SIGTERM to the driver alone (a scheduler, `kill`, `timeout`)          --resume continues from; exit
                                                                         130 / 143; no Ray process left,
                                                                         no Ray stack dump on the console
Then `--resume` continues from that checkpoint, and a second `--resume` with a larger `rl.steps`
continues the finished stage (each step logged exactly once). One run folder takes all three runs: Ctrl-C
stops the first, SIGTERM the third.
"""
from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest

# The long tier's: `make test` stops a run by SIGTERM mid-step and resumes it exactly (test_train_cli.py's
# colocated GRPO run: exit 143, the one line, no Ray dump, no process left), and the stop line and a finished
# stage's continuation are the fast tier's (test_rough_edges.py)
pytestmark = [pytest.mark.slow, pytest.mark.long]

from helpers import RAY_DUMP, rl_steps_logged, start_train, stop_once_logged  # noqa: E402  (tests/e2e is on the path)

ARGS = ["configs/quickstart.yaml", "run.stages=[rl]", "rl.init_from=builtin:tiny", "rl.steps=40", "rl.save_every=1",
        "rl.sample_every=0", "logging.report=false", "logging.tensorboard=false",
        "reward.sources=[{kind: function, path: 'rlhf_ray.data.builtin_reviews:vader_reward'}]"]
STOPPED = re.compile(r"rlhf-ray: stopped by (?P<how>.+) in stage rl after step (?P<step>\d+); rerun with --resume "
                     r"to continue rl from its checkpoint of step (?P<ckpt>\d+)$")


def finish(out: Path, *extra: str) -> str:
    p = start_train(ARGS, out, *extra)
    stdout, stderr = p.communicate(timeout=900)
    assert p.returncode == 0, stdout[-2000:] + stderr[-3000:]
    return stdout + stderr


def one_stop_line(stderr: str, how: str, logged: list[int]) -> int:
    """The run's only words on stderr: where it stopped and the checkpoint --resume continues from."""
    lines = [x for x in stderr.splitlines() if x.strip()]
    assert len(lines) == 1, stderr[-3000:]
    m = STOPPED.match(lines[0])
    assert m and m["how"] == how, lines[0]
    assert int(m["step"]) == logged[-1], (lines[0], logged)
    # stopped between a step's log and its save, or after it (a step past the first: one is saved)
    assert int(m["ckpt"]) in (logged[-1] - 1, logged[-1]), lines[0]
    return int(m["ckpt"])


def test_ctrl_c_and_sigterm_say_where_resume_continues_and_a_larger_rl_steps_extends_the_finished_stage(tmp_path):
    """Ctrl-C at step 2, `--resume` to the end, then `--resume` with a larger rl.steps continues the finished
    stage, and SIGTERM stops that run too: one run folder, three runs, each step logged exactly once."""
    out = tmp_path / "run"
    code, _, stderr = stop_once_logged(start_train(ARGS, out), out, 2, lambda p: os.killpg(p.pid, signal.SIGINT))
    assert code == 130, stderr[-3000:]
    ckpt = one_stop_line(stderr, "Ctrl-C (SIGINT)", rl_steps_logged(out))

    end = ckpt + 1
    said = finish(out, f"rl.steps={end}", "--resume")
    assert f"resumed from {out / 'rl' / 'checkpoints' / f'step_{ckpt:06d}'} at step {ckpt}" in said, said[-3000:]
    assert rl_steps_logged(out) == list(range(1, end + 1))
    assert (out / "rl" / "model" / "config.json").exists()

    # the stage is finished: more steps continue it; SIGTERM (to the driver alone) once it has done two more
    code, stdout, stderr = stop_once_logged(start_train(ARGS, out, "--resume"), out, end + 2,
                                      lambda p: p.send_signal(signal.SIGTERM))
    assert f"at step {end} with rl.steps changed" in stdout, stdout[-3000:]
    assert code == 143, stderr[-3000:]
    dump = [x for x in (stdout + stderr).splitlines() if any(d in x for d in RAY_DUMP)]
    assert not dump, "\n".join(dump[:10])
    one_stop_line(stderr, "SIGTERM", rl_steps_logged(out))
    assert rl_steps_logged(out) == list(range(1, len(rl_steps_logged(out)) + 1))
