"""Run untrusted Python (the policy's code) in a child process with limits, and never raise.

Limits come from the standard library (`resource.setrlimit` in the child, before it runs anything) plus a
Linux network namespace: no sandboxing package is needed for what a policy's arithmetic or a unit test
does, nothing extra ships, and each limit is enforced by the kernel on the child alone:
  time       RLIMIT_CPU (CPU seconds) and a wall-clock timeout in the parent (a `sleep` uses no CPU): the
             child's process group is killed
  memory     RLIMIT_AS (address space): a big allocation raises MemoryError in the child
  output     stdout and stderr go to a file in the scratch folder, capped by RLIMIT_FSIZE: a child printing
             megabytes is stopped at the cap, and the parent never reads more than the cap
  network    an empty network namespace (unshare(CLONE_NEWUSER | CLONE_NEWNET): no interface but a down
             loopback) where the kernel allows unprivileged namespaces; and `socket` refused inside Python
             in every case
  files      a fresh scratch folder as the working directory, removed afterwards; `python -I -S` (no user
             site, no environment variables read)
What it does not do: a seccomp filter or a read-only root (the child can read files the user can). A policy
that breaks out of Python (ctypes) still has no network where the namespace exists. For adversarial code
use a container; this is the boundary for a training run's own policy.
"""
from __future__ import annotations

import ctypes
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

from rlhf_ray.envs.base import ToolResult

_CLONE_NEWUSER, _CLONE_NEWNET = 0x10000000, 0x40000000

# Run first in the child: no socket can be made, whatever the namespace gave.
_PRELUDE = """\
import socket as _s
def _no_network(*a, **k):
    raise OSError("network is disabled in this sandbox")
_s.socket = _no_network; _s.create_connection = _no_network; _s.socketpair = _no_network
del _s, _no_network
__name__ = "__main__"
exec(compile(open("main.py").read(), "main.py", "exec"))
"""


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 2.0      # wall clock; CPU seconds are limited to the same (rounded up)
    memory_mb: int = 256        # address space
    output_bytes: int = 2048    # what the policy gets back (the file cap is this plus a margin)


def _limit_child(limits: Limits):
    """preexec_fn: runs in the child between fork and exec."""
    def apply():
        os.setsid()  # its own process group: a timeout kills whatever it spawned too
        cpu = max(1, int(limits.timeout_s + 0.999))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        mem = limits.memory_mb * 2 ** 20
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        cap = limits.output_bytes + 1024  # the same cap `run_python` reads as "printed too much"
        resource.setrlimit(resource.RLIMIT_FSIZE, (cap, cap))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        libc = ctypes.CDLL(None, use_errno=True)
        libc.unshare(_CLONE_NEWUSER | _CLONE_NEWNET)  # refused on some kernels: the prelude still holds
    return apply


def truncate(text: str, limit: int) -> str:
    """At most `limit` characters, marked when cut: the start and the end (where a traceback names the error)."""
    if len(text) <= limit:
        return text
    head = limit // 2
    return text[:head] + f"\n[output truncated at {limit} characters]\n" + text[len(text) - (limit - head):]


def run_python(code: str, limits: Limits = Limits()) -> ToolResult:
    """Execute `code`; its printed output (stdout and stderr, cut to `limits.output_bytes`). ok is False on an
    exception, a limit, a crash or a non-zero exit, and the text then says which."""
    scratch = tempfile.mkdtemp(prefix="rlhf_ray_tool_")
    try:
        out_path = os.path.join(scratch, ".output")
        with open(os.path.join(scratch, "main.py"), "w") as f:
            f.write(code)
        with open(out_path, "wb") as out:
            proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", _PRELUDE], cwd=scratch, stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=subprocess.STDOUT, env={"PATH": "/usr/bin:/bin"},
                                    preexec_fn=_limit_child(limits), close_fds=True)
            try:
                code_ = proc.wait(timeout=limits.timeout_s)
                why = None
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                code_, why = proc.returncode, f"timed out after {limits.timeout_s:g} s"
        flooded = os.path.getsize(out_path) >= limits.output_bytes + 1024  # at the file cap: writes past it failed
        with open(out_path, "rb") as f:
            raw = f.read(limits.output_bytes + 1)
        if why is None and flooded and code_ != 0:
            why = f"printed more than {limits.output_bytes} bytes"
        text = truncate(raw.decode("utf-8", "replace"), limits.output_bytes)
        if why is None and code_ < 0:
            sig = -code_
            why = {signal.SIGXFSZ: f"printed more than {limits.output_bytes} bytes",
                   signal.SIGXCPU: f"used more than {limits.timeout_s:g} s of CPU",
                   signal.SIGKILL: "killed"}.get(sig, f"crashed ({signal.Signals(sig).name})")
        elif why is None and code_ != 0:
            why = f"exited with code {code_}"
        if why is not None:
            return ToolResult(False, truncate(f"error: {why}\n{text}".rstrip(), limits.output_bytes))
        return ToolResult(True, text)
    except OSError as e:  # the sandbox itself failed to start: still an observation, the run goes on
        return ToolResult(False, f"error: the sandbox failed to start: {e}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
