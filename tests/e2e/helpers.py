"""Shared by the end-to-end tests: the CLI as a user runs it, and what a run leaves behind."""
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from rlhf_ray.utils.net import free_port
from rlhf_ray.utils.shm import descendants

ROOT = Path(__file__).resolve().parents[2]
QUICK = str(ROOT / "configs" / "quickstart.yaml")
LOGS = Path(os.environ.get("PYTEST_SERVE_LOGS", tempfile.gettempdir()))  # the run's folder (run_scratch.py)
# The session's shared SFT + reward model (conftest.py `offline`), 56 steps each: Ray Train keeps the run's two
# newest checkpoints (the reward model's at 20 and 40), which test_train_cli's resume of the reward model uses.
OFFLINE_SAVES = ("sft.save_every=20", "rm.save_every=20")
PIPELINE_ARGS = ("run.stages=[sft,rm]", "sft.epochs=1", *OFFLINE_SAVES)


# Library lines that once showed in every run and that no operator can act on (see rlhf_ray/runtime.py for
# where each is silenced): none may come back.
NOISE = {
    "Token authentication is enabled": "Ray's notice when RAY_AUTH_MODE is unset",
    "PreemptionWatcher": "Ray Train's preemption watcher on a single machine",
    "NUMA binding": "vLLM's CPU worker through torch's C++ log",
    "Setting accelerator to": "DeepSpeed's accelerator probe",
    "gemm_4bit_forward": "bitsandbytes' optional kernel package",
    "Triton not available": "torch on a machine without Triton",
    "Loading safetensors checkpoint shards": "vLLM's weight-loading bar (use_tqdm_on_load=False)",
}


# What a step redone from a checkpoint must reproduce (policy, optimizer, prompt position, sampling seeds, and the
# engines given the restored weights); runs with a critic add its keys.
SAME_AFTER_RESUME = ("reward/score_mean", "kl/mean", "policy/loss", "policy/objective", "response/len_mean",
                     "policy/grad_norm")


def pipeline_record(offline: Path) -> dict:
    """What the session's pipeline run (conftest.py `offline`) saw as it trained: the kill of its Ray Train
    worker (`killed`: the pid, or why none), SFT's model file time at the kill, the run's console."""
    return json.loads((offline.parent / "pipeline.json").read_text())


def assert_quiet_console(p: subprocess.CompletedProcess) -> None:
    """The run's console shows our progress bars, step lines and real warnings, none of NOISE."""
    noisy = [line for line in (p.stdout + p.stderr).splitlines() if any(n in line for n in NOISE)]
    assert not noisy, "library noise on the console:\n" + "\n".join(noisy[:10])


def train(*args, timeout=900, check=True):
    """`rlhf-ray train configs/quickstart.yaml ARGS...`; raises with the run's output when it fails."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    p = subprocess.run([sys.executable, "-m", "rlhf_ray.cli", "train", QUICK, *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"train failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return p


def serve(what: str, *overrides, probe="/v1/models", headers=None, env_extra=None, timeout=420):
    """`rlhf-ray serve configs/quickstart.yaml --what WHAT` on a free port, in its own process group; returns
    (process, url) once `probe` answers 200. Its output goes to a file under $PYTEST_SERVE_LOGS: a pipe
    nobody reads would fill and block the server."""
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0", **(env_extra or {})}
    log = LOGS / f"serve-{what}-{port}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "rlhf_ray.cli", "serve", QUICK, f"serve.port={port}",
                                 *overrides, "--what", what, "--seconds", "900"], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"serve exited early:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url + probe, headers=headers, timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(2)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail(f"the server did not come up in {timeout} s:\n{log.read_text()[-3000:]}")


def mean_of(rows: list[dict], key: str, k: int = 3) -> tuple[float, float]:
    """(mean of the first k, mean of the last k) of `key`: one step's batch is too noisy to compare."""
    vals = [r[key] for r in rows]
    return sum(vals[:k]) / k, sum(vals[-k:]) / k


def assert_learned_on_held_out_prompts(rows: list[dict], evals_at: list[int]) -> None:
    """Held-out prompts (never trained on), judged greedy and sampled by the reward model and by the VADER
    "gold" judge (never trained on either): both rose from the first evaluation (before step 1) to the last."""
    evals = [r for r in rows if "eval/greedy_gold" in r]
    assert [r["step"] for r in evals] == evals_at
    first, last = evals[0], evals[-1]
    for kind in ("greedy", "sampled"):
        assert last[f"eval/{kind}_gold"] > first[f"eval/{kind}_gold"] + 0.1, (kind, first, last)
        assert last[f"eval/{kind}_reward"] > first[f"eval/{kind}_reward"] + 0.5, (kind, first, last)


def assert_the_kl_regularised_objective_rose(rows: list[dict]) -> None:
    """What these runs maximise is the reward less beta times the KL to the reference per sequence. How far
    the KL itself drifts depends on the sampled trajectory, and so on the CPU kind (the same 12-step runs
    peaked at 0.2-0.5 nats per token on an AMD EPYC, 1.1-1.9 on an Intel Xeon with AMX): not a bound of the
    product. That the regularised objective rises is: a run whose KL term pushed the wrong way, or grew
    faster than the reward it bought, fails here."""
    objective = [{"j": r["reward/score_mean"] - r["kl/coef"] * r["kl/seq_mean"]} for r in rows]
    start, end = mean_of(objective, "j")
    assert end > start + 0.25, [round(o["j"], 3) for o in objective]


def start_train(args: list[str], out: Path, *extra: str, pythonpath: str = "") -> subprocess.Popen:
    """`rlhf-ray train ARGS run.output_dir=OUT EXTRA...` in its own process group (so a test can signal or kill
    all of it), its output on pipes; `pythonpath` puts the test's own modules (reward functions) in reach."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join([pythonpath, os.environ.get("PYTHONPATH", "")])
    return subprocess.Popen([sys.executable, "-m", "rlhf_ray.cli", "train", *args, f"run.output_dir={out}", *extra],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=_signals_as_from_a_shell)


def _signals_as_from_a_shell() -> None:
    """The run starts with SIGINT and SIGTERM unblocked and SIGINT at its default, as a shell starts a command: a
    blocked or ignored signal is inherited across exec, and a pytest worker that ran other tests before (an
    in-process Ray driver among them) is not a clean parent. Seen in CI (2 of 2 runs of the long tier): a run
    started here after other long tests ignored the Ctrl-C and ran to its end (exit 0); started alone it stopped."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def rl_steps_logged(out: Path) -> list[int]:
    """The RL steps a run under `out` has logged so far (whole lines only)."""
    f = out / "rl" / "metrics.jsonl"
    return [json.loads(x)["step"] for x in f.read_text().splitlines() if x.strip()] if f.exists() else []


def training_rows(run_dir: Path) -> list[dict]:
    """The step rows of `run_dir/metrics.jsonl` written so far (whole lines only: the driver may be writing
    the next one; evaluation-only rows left out)."""
    log = run_dir / "metrics.jsonl"
    lines = log.read_text().split("\n")[:-1] if log.exists() else []
    return [r for r in map(json.loads, lines) if "reward/score_mean" in r]


def kill_while_training(args: list[str], out: Path, step: int, timeout: float = 900) -> list[dict]:
    """`rlhf-ray train configs/quickstart.yaml ARGS` in its own process group, SIGKILLed whole (the driver and
    every Ray process it started) once `step` training steps are logged, while it trains the next; asserts
    the kill landed mid-run. Returns the training rows logged before the kill."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    err = out.parent / f"{out.name}.stderr"  # a file, not a pipe: nobody reads a pipe until the end
    with err.open("w") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "rlhf_ray.cli", "train", QUICK, *args], cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=sink, start_new_session=True)
    deadline = time.time() + timeout
    while len(training_rows(out / "rl")) < step:
        if proc.poll() is not None:
            pytest.fail(f"the run ended before step {step}:\n{err.read_text()[-3000:]}")
        assert time.time() < deadline, f"step {step} was not logged in {timeout:.0f} s"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run had finished before the kill"
    assert not (out / "rl" / "model").exists()  # killed mid-run: no final export
    return training_rows(out / "rl")


def live_in_session(sid: int) -> list[str]:
    """Processes of session `sid` that still run (zombies waiting for a reaper are gone already)."""
    found = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                state, _, _, session = open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[:4]
                if int(session) == sid and state != "Z":
                    found.append(f"{d} {open(f'/proc/{d}/cmdline').read().replace(chr(0), ' ')[:100]}")
            except (OSError, ValueError):
                continue
    return found


def assert_session_ends(sid: int, within: float = 10) -> None:
    """No process of session `sid` (a stopped run: its driver, Ray's raylet, GCS and workers) still runs
    `within` s later; any left are killed and named."""
    left, deadline = live_in_session(sid), time.time() + within
    while left and time.time() < deadline:
        time.sleep(0.5)
        left = live_in_session(sid)
    for line in left:
        os.kill(int(line.split()[0]), signal.SIGKILL)
    assert not left, "processes of the stopped run still run:\n" + "\n".join(left)


RAY_DUMP = ("logging.cc", "SIGTERM received", "PC: @", "Traceback")


def stop_once_logged(proc: subprocess.Popen, out: Path, steps: int, send, timeout: float = 600,
                     logged=rl_steps_logged) -> tuple[int, str, str]:
    """`send(proc)` once a run started by `start_train` has logged `steps` RL steps (`logged(out)`: its rows so
    far); then its exit status and output. Fails if a process of the run (its own session) is still running
    10 s later."""
    deadline = time.time() + timeout
    while len(logged(out)) < steps:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, f"the run did not log {steps} steps in {timeout:.0f} s"
        time.sleep(0.05)
    send(proc)
    try:
        stdout, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert_session_ends(proc.pid)
    return proc.returncode, stdout, stderr


def sigterm_while_training(args: list[str], out: Path, step: int) -> tuple[list[dict], str]:
    """`rlhf-ray train configs/quickstart.yaml ARGS` in its own session, sent SIGTERM (to the driver alone, as a
    scheduler or `kill` does) once `step` steps are logged, while it trains the next. The run must exit 143
    with no Ray stack dump, every process of its session gone. Returns the training rows logged before the
    stop and what the run wrote on stderr."""
    proc = start_train([QUICK, *args], out)  # run.output_dir from ARGS: the last one given wins
    code, stdout, stderr = stop_once_logged(proc, out, step, lambda p: p.send_signal(signal.SIGTERM),
                                            logged=lambda o: training_rows(o / "rl"))  # not its evaluation rows
    assert code == 143, stderr[-3000:]
    dump = [x for x in (stdout + stderr).splitlines() if any(d in x for d in RAY_DUMP)]
    assert not dump, "\n".join(dump[:10])
    assert not (out / "rl" / "model").exists()  # stopped mid-run: no final export
    return training_rows(out / "rl"), stderr


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]


def stop_process(proc: subprocess.Popen, timeout: float = 120, whole_group: bool = False) -> bool:
    """SIGTERM, then SIGKILL to the process group if it is still up after `timeout` s. `proc` must lead its
    own group (`start_new_session=True`). whole_group: SIGTERM every process of the group too (a shell
    script that waits on `ray start --block` forwards nothing), else only the leader, which then shuts its
    children down itself (the CLI stops Serve and its Ray). Returns whether it stopped on SIGTERM."""
    if whole_group:
        os.killpg(proc.pid, signal.SIGTERM)
    else:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
        return True
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return False


def kill_matching(pattern: str) -> list[str]:
    """SIGKILL the processes whose command line holds `pattern` (a test's own temp dir, so nobody else's);
    returns their pids, so a test can fail on processes that outlived their parent."""
    pids = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:  # exited between pgrep and kill
            pass
    return pids


# -- a role's process killed mid-call (test_faults.py, test_async_cli.py) ------------------------------------
def _title(pid: int) -> str:
    try:
        return open(f"/proc/{pid}/cmdline").read().split("\0")[0]
    except OSError:
        return ""


def role_pids(driver: int, cls: str) -> list[int]:
    """The worker processes of actor class `cls`: Ray titles one `ray::Class` when idle, `ray::Class.method`
    while it runs a call."""
    return [pid for pid in descendants(driver) if re.match(rf"ray::{re.escape(cls)}(\.|\(|\s|$)", _title(pid))]


def kill_during(proc: subprocess.Popen, out: Path, call: str, after_step: int, timeout: float = 600) -> int:
    """SIGKILL the process of `call` while it runs, in the first step after `after_step` is logged. The call
    may be short (a tiny model's update: 0.2 s), so once the step is logged only the role's own processes are
    watched, a few milliseconds apart: walking the driver's whole tree each time took longer than that on a
    loaded 2-core machine, and the window was missed."""
    deadline = time.time() + timeout
    running = re.compile(rf"ray::{re.escape(call)}(\(|\s|$)")
    pids: list[int] = []
    looked, logged = 0.0, False
    while True:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, f"the run did not reach a {call} after step {after_step}"
        logged = logged or len(rl_steps_logged(out)) >= after_step
        if not logged:
            time.sleep(0.05)
            continue
        if time.time() - looked > 1.0:  # (again now and then: a restarted role has a new process)
            pids, looked = role_pids(proc.pid, call.split(".")[0]), time.time()
        pid = next((p for p in pids if running.match(_title(p))), None)
        if pid is None:
            time.sleep(0.002)
            continue
        os.kill(pid, signal.SIGKILL)
        idle = [p for p in descendants(proc.pid) if _title(p).startswith("ray::IDLE")]
        # every process of a running run is a role (or Ray's own): no idle worker started for nothing
        # (runtime.py: the raylet's prestart, about 1 CPU-second a run)
        assert not idle, f"{len(idle)} idle Ray workers beside the roles"
        return pid


def finish(proc: subprocess.Popen, timeout: float = 900) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return proc.returncode, err
