"""CI time: building and stepping a learner (ZeRO-2, two micro-batches) compiles no DeepSpeed op.

DeepSpeed would otherwise compile its shared-memory all-reduce (at init_distributed) and a C++ Adam
(for its config optimizers) into TORCH_EXTENSIONS_DIR on first use: minutes each (STACK.md).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

SCRIPT = """
from rlhf_ray.offline.stages import sft_step_loss
from tests.learner.helpers import make_learner, split, token_batches
learner = make_learner(zero=2)
learner.train_step(sft_step_loss, split(token_batches(1)[0]))
print("stepped")
"""


def test_learner_compiles_no_deepspeed_op(tmp_path):
    ext = tmp_path / "torch_extensions"
    dist_vars = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")  # set by in-process tests
    env = {k: v for k, v in os.environ.items() if k not in dist_vars} | {"TORCH_EXTENSIONS_DIR": str(ext)}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=root, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "stepped" in out.stdout
    built = [p.name for p in ext.rglob("*.so")] if ext.exists() else []
    assert built == [], f"DeepSpeed compiled ops: {built}"
    assert "built successfully" not in out.stdout + out.stderr
