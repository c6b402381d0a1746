"""One temp folder per test run, removed when the run passes.

A `make test` left about 260 MB in /tmp for good: pytest's own folders (it keeps the last three runs'), a Ray
session folder for every cluster the tests start (their logs), the test servers' logs (e2e/helpers.serve), and
what processes killed on purpose could not remove (multiprocessing's `pymp-*` folders). The run's first
process (pytest-xdist's controller, or pytest alone) makes one folder and hands it on as TMPDIR: the workers
and everything they start inherit it, Ray included. It goes when the run passes; a failed run keeps it for its
logs and says where.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path


class RunScratch:
    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="rlhf_ray_tests_"))  # inside the operator's own TMPDIR if set
        os.environ["TMPDIR"] = tempfile.tempdir = str(self.root)
        self.passed = False

    def pytest_sessionfinish(self, session, exitstatus) -> None:
        self.passed = exitstatus == 0

    def pytest_unconfigure(self, config) -> None:
        if self.passed:
            shutil.rmtree(self.root, ignore_errors=True)
        elif self.root.exists():
            print(f"\nthis run's temp folder (Ray's and the servers' logs, pytest's folders) is kept: {self.root}",
                  file=sys.stderr)


def register(config) -> None:
    """From pytest_configure: in the run's first process only (an xdist worker inherits the folder)."""
    if not hasattr(config, "workerinput"):
        config.pluginmanager.register(RunScratch(), "rlhf_ray_run_scratch")
