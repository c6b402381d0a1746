"""A process that makes and maps a file in /dev/shm, as a vLLM worker does its buffers, then waits to be killed
(test_shm.py, roles/generator/test_engine_close.py)."""
import subprocess
import sys
from pathlib import Path

HOLD = """
import mmap, sys, time
f = open(sys.argv[1], "w+b"); f.truncate(4096); m = mmap.mmap(f.fileno(), 4096)
print("mapped", flush=True); time.sleep(60)
"""


def hold(path: Path) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "mapped"
    return p
