"""A test run's temp files live in one folder of its own (run_scratch.py): gone when the run passes, kept and
named when it fails. Shown on a pytest run of its own, its conftest registering the plugin as ours does."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
CONFTEST = f"""import sys
sys.path.insert(0, {str(TESTS)!r})
import run_scratch

def pytest_configure(config):
    run_scratch.register(config)
"""
TEST = """import os, subprocess, sys, tempfile

def test_temp_files_land_in_the_runs_folder():
    made = tempfile.mkdtemp(prefix="pymp-")       # this process's temp files
    child = subprocess.run([sys.executable, "-c", "import tempfile; print(tempfile.gettempdir())"],
                           capture_output=True, text=True, check=True).stdout.strip()
    print("ROOT", os.environ["TMPDIR"], made, child)
    assert os.path.dirname(made) == child == os.environ["TMPDIR"]   # and those of the processes it starts
    assert os.environ.get("FAIL") != "1"
"""


def _run(tmp_path, fail: bool) -> tuple[subprocess.CompletedProcess, Path]:
    (tmp_path / "conftest.py").write_text(CONFTEST)
    (tmp_path / "test_inner.py").write_text(TEST)
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "test_inner.py"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "FAIL": "1" if fail else "0"})
    root = re.search(r"^ROOT (\S+)", p.stdout, re.M)
    assert root, p.stdout + p.stderr
    return p, Path(root.group(1))


def test_a_passing_run_removes_its_temp_folder(tmp_path):
    p, root = _run(tmp_path, fail=False)
    assert p.returncode == 0, p.stdout + p.stderr
    assert root.name.startswith("rlhf_ray_tests_") and not root.exists()


def test_a_failing_run_keeps_its_temp_folder_and_says_where(tmp_path):
    p, root = _run(tmp_path, fail=True)
    try:
        assert p.returncode == 1
        assert root.is_dir() and any(x.name.startswith("pymp-") for x in root.iterdir())
        assert f"is kept: {root}" in p.stderr
    finally:
        shutil.rmtree(root, ignore_errors=True)
