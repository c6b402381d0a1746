"""`utils.env.environ_for`: variables changed for a block (a Ray start, an engine build, a simulated cluster)
and put back as they were, also when the block raises."""
import os

import pytest

from rlhf_ray.utils.env import environ_for


def test_a_block_sees_its_values_and_the_process_gets_its_own_back_also_after_an_error(monkeypatch):
    monkeypatch.setenv("RLHF_RAY_T_SET", "before")
    monkeypatch.setenv("RLHF_RAY_T_GONE", "kept")
    monkeypatch.delenv("RLHF_RAY_T_NEW", raising=False)
    with pytest.raises(RuntimeError):
        with environ_for(RLHF_RAY_T_SET="inside", RLHF_RAY_T_GONE=None, RLHF_RAY_T_NEW="new"):
            assert os.environ["RLHF_RAY_T_SET"] == "inside" and os.environ["RLHF_RAY_T_NEW"] == "new"
            assert "RLHF_RAY_T_GONE" not in os.environ
            raise RuntimeError("the block failed")
    assert os.environ["RLHF_RAY_T_SET"] == "before" and os.environ["RLHF_RAY_T_GONE"] == "kept"
    assert "RLHF_RAY_T_NEW" not in os.environ
