"""The generate stage's record: joining per-engine rollouts (no Ray, no vLLM; spreading prompts over engines
is tests/test_dispatch.py's)."""
import pytest

from rlhf_ray.records import Rollout, concat_rollouts


def _rollout(version=3):
    return Rollout(prompt_ids=[[5, 6], [5, 6], [7]], response_ids=[[1, 2, 3], [4], []],
                   response_logprobs=[[-0.1, -0.2, -0.3], [-0.4], []], texts=["a", "b", ""],
                   prompt_index=[0, 0, 1], finish_reasons=["length", "stop", "stop"], weight_version=version,
                   temperature=1.0)


def test_concat_shifts_prompt_index_and_refuses_mixed_versions():
    joined = concat_rollouts([_rollout(), _rollout()], prompt_offsets=[0, 2])
    assert joined.prompt_index == [0, 0, 1, 2, 2, 3] and len(joined) == 6 and joined.weight_version == 3
    with pytest.raises(ValueError, match="different weight versions"):
        concat_rollouts([_rollout(3), _rollout(4)], [0, 2])
