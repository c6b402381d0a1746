"""Building an engine: vLLM's garbage collections during the build skip the objects that existed before it
(its five full passes over an imported torch + transformers + vLLM cost a second or two), after one pass that
frees what was garbage already; the collector is whole again afterwards, also when the build fails."""
import gc
import os
import tempfile
import weakref
from pathlib import Path

import pytest

from rlhf_ray.config.schema import RolloutConfig
from rlhf_ray.roles.generator.engine import GeneratorEngine
from rlhf_ray.utils.device import resolve_backend

# vLLM's LLM is a stand-in here (no engine starts, a second at most), but the fast tier refuses to construct a
# GeneratorEngine at all (tests/conftest.py)
pytestmark = pytest.mark.slow


class Cycle:
    def __init__(self):
        self.me = self


def _build(monkeypatch, llm_cls):
    import vllm
    monkeypatch.setattr(vllm, "LLM", llm_cls)
    return GeneratorEngine("builtin-free-path", RolloutConfig(), resolve_backend("cpu", "float32"))


def test_the_build_runs_with_what_existed_frozen_and_old_garbage_freed(monkeypatch):
    garbage = Cycle()
    gone = weakref.ref(garbage)
    del garbage
    seen = {}

    class LLM:
        def __init__(self, **kwargs):
            seen["frozen"] = gc.get_freeze_count()
            seen["garbage_freed"] = gone() is None

        def get_tokenizer(self):
            return None

    engine = _build(monkeypatch, LLM)
    assert seen["frozen"] > 0 and seen["garbage_freed"]
    assert gc.get_freeze_count() == 0
    engine.close()


def test_a_failed_build_leaves_the_collector_whole_and_no_scratch_folder(monkeypatch):
    made = []

    class LLM:
        def __init__(self, **kwargs):
            made.append(Path(tempfile.gettempdir()))  # the engine's scratch, vLLM's temp folder while it builds
            raise RuntimeError("no engine")

    with pytest.raises(RuntimeError, match="no engine"):
        _build(monkeypatch, LLM)
    assert gc.get_freeze_count() == 0
    assert made[0].name.startswith(f"rlhf_ray_engine_{os.getpid()}_") and not made[0].exists()
    assert tempfile.gettempdir() != str(made[0])
