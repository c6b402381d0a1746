"""The tools: the calculator (no eval), and the Python executor's child process with its limits. A tool that
hangs, crashes, eats memory, prints megabytes or reaches for the network answers with a cut error observation."""
import time

import pytest

from rlhf_ray.envs.sandbox import Limits, run_python
from rlhf_ray.envs.tools import Calculator, ToolActor, build_tools, evaluate

# generous for programs that end (a loaded CI machine starts Python slowly), short for the ones that must time out
FAST = Limits(timeout_s=10.0, memory_mb=128, output_bytes=256)
HANG = Limits(timeout_s=0.5, memory_mb=128, output_bytes=256)


def test_the_calculator_computes_arithmetic_and_refuses_everything_else():
    assert evaluate("37 + 4 * 12") == 85 and evaluate("(2 ^ 10) // 3") == 341
    calc = Calculator(64)
    assert calc("84 / 4").text == "21" and calc("1 / 3").text == "0.333333"
    for bad, why in (("__import__('os').system('true')", "unsupported syntax: Call"),
                     ("9 ** 9 ** 9", "larger than 64"), ("1 / 0", "ZeroDivisionError"), ("2 +", "SyntaxError"),
                     ("x * 2", "unsupported syntax: Name")):
        r = calc(bad)
        assert not r.ok and why in r.text, (bad, r.text)
    assert len(calc("1" * 500).text) < 120


def test_code_runs_in_a_scratch_folder_of_its_own():
    first = run_python("import os; open('f', 'w').write('x'); print(os.getcwd())", FAST)
    second = run_python("import os; print(os.listdir('.'))", FAST)
    assert first.ok and "rlhf_ray_tool_" in first.text
    assert second.ok and second.text.strip() == "['main.py', '.output']"  # the first call's file is gone


@pytest.mark.parametrize("code, why", [
    ("while True: pass", "timed out after 0.5 s"),
    ("import time; time.sleep(30)", "timed out after 0.5 s"),
    ("import os; os.abort()", "crashed (SIGABRT)"),
    ("raise ValueError('boom')", "ValueError: boom"),
    ("x = bytearray(1024 ** 3)", "MemoryError"),
    ("import socket; socket.socket()", "network is disabled"),
    ("import sys; sys.exit(3)", "exited with code 3"),
])
def test_a_hanging_crashing_or_greedy_program_is_an_error_observation(code, why):
    limits = HANG if "timed out" in why else FAST
    t0 = time.perf_counter()
    r = run_python(code, limits)
    assert not r.ok and r.text.startswith("error:") and why in r.text, r.text
    assert time.perf_counter() - t0 < limits.timeout_s + 5.0   # a hang is killed at its limit, not waited for


def test_megabytes_of_output_are_cut_to_the_limit():
    r = run_python("print('x' * 10_000_000)", FAST)
    assert not r.ok and "printed more than 256 bytes" in r.text
    assert len(r.text) <= 256 + 60 and "[output truncated at 256 characters]" in r.text
    ok = run_python("print('y' * 300)", Limits(10.0, 128, 1000))
    assert ok.ok and ok.text == "y" * 300 + "\n"


def _namespaces_allowed() -> bool:
    import subprocess
    return subprocess.run(["unshare", "--user", "--net", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _namespaces_allowed(), reason="this kernel refuses unprivileged network namespaces: the "
                    "sandbox then relies on refusing sockets inside Python alone (tested above)")
def test_a_child_that_escapes_python_still_has_no_network():
    # below the Python-level refusal: the process lives in a network namespace of its own (no interface but a
    # loopback that is down), so raw syscalls reach nothing either
    import os
    r = run_python("import os; print(os.readlink('/proc/self/ns/net'))", FAST)
    assert r.ok and r.text.strip().startswith("net:[") and r.text.strip() != os.readlink("/proc/self/ns/net")
    r = run_python("import ctypes, ctypes.util\nlibc = ctypes.CDLL(None)\nprint(libc.socket(2, 1, 0))", FAST)
    assert r.ok and r.text.strip() != "-1"   # a socket can be made by a syscall...
    r = run_python("import ctypes, struct\nlibc = ctypes.CDLL(None, use_errno=True)\nfd = libc.socket(2, 1, 0)\n"
                   "addr = struct.pack('!HH4s8x', 2, 53, bytes([8, 8, 8, 8]))\n"
                   "print(libc.connect(fd, addr, 16), ctypes.get_errno())", FAST)
    assert r.ok and r.text.split()[0] == "-1", r.text  # ...but it reaches nothing


def test_tools_in_process_and_the_actor_shell_answer_alike():
    tools, actors = build_tools(("calculator", "python"), FAST, on_ray=False)
    assert actors == [] and tools["calculator"]("6*7").text == "42" and tools["python"]("print(6*7)").text == "42\n"
    assert ToolActor(Calculator()).call("2+2").text == "4"
    with pytest.raises(ValueError, match="unknown tool 'shell'"):
        build_tools(("shell",), FAST, on_ray=False)
