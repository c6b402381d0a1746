"""Environment variables changed for a block only: the processes started inside read them as they start."""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Optional


@contextmanager
def environ_for(**changes: Optional[str]):
    """Each named variable set to its value (None: removed) inside the block, then back as it was, also when
    the block raises."""
    before = {name: os.environ.get(name) for name in changes}
    try:
        for name, value in changes.items():
            _put(name, value)
        yield
    finally:
        for name, value in before.items():
            _put(name, value)


def _put(name: str, value: Optional[str]) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
