"""Pure pieces of the generator: prompt spreading and joining per-engine rollouts (no Ray, no vLLM)."""
import pytest

from rlhf_ray.dispatch import split_evenly
from rlhf_ray.generator.records import Rollout, concat_rollouts


def _rollout(version=3):
    return Rollout(prompt_ids=[[5, 6], [5, 6], [7]], response_ids=[[1, 2, 3], [4], []],
                   response_logprobs=[[-0.1, -0.2, -0.3], [-0.4], []], texts=["a", "b", ""],
                   prompt_index=[0, 0, 1], finish_reasons=["length", "stop", "stop"], weight_version=version,
                   temperature=1.0)


@pytest.mark.parametrize("n,k", [(0, 1), (5, 2), (7, 3), (2, 4), (9, 9)])
def test_split_evenly_is_contiguous_and_balanced(n, k):
    items = list(range(n))
    parts = split_evenly(items, k)
    assert len(parts) == k
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    assert [x for part in parts for x in part] == items


def test_split_rejects_zero_parts():
    with pytest.raises(ValueError):
        split_evenly([1], 0)


def test_concat_shifts_prompt_index_and_refuses_mixed_versions():
    joined = concat_rollouts([_rollout(), _rollout()], prompt_offsets=[0, 2])
    assert joined.prompt_index == [0, 0, 1, 2, 2, 3] and len(joined) == 6 and joined.weight_version == 3
    with pytest.raises(ValueError, match="different weight versions"):
        concat_rollouts([_rollout(3), _rollout(4)], [0, 2])
