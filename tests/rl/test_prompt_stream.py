import pytest

from rlhf_ray.rl.prompt_stream import PromptStream


def test_resume_continues_exactly_where_it_stopped():
    prompts = [f"p{i}" for i in range(10)]
    full = PromptStream(prompts, 4, seed=3)
    ref = [full.next_batch() for _ in range(7)]
    a = PromptStream(prompts, 4, seed=3)
    seen = [a.next_batch() for _ in range(3)]
    b = PromptStream(prompts, 4, seed=3)
    b.load_state_dict(a.state_dict())
    seen += [b.next_batch() for _ in range(4)]
    assert seen == ref


def test_each_epoch_visits_every_prompt_once():
    prompts = [f"p{i}" for i in range(8)]
    s = PromptStream(prompts, 4, seed=0)
    epoch0 = s.next_batch() + s.next_batch()
    assert sorted(epoch0) == sorted(prompts)
    epoch1 = s.next_batch() + s.next_batch()
    assert sorted(epoch1) == sorted(prompts) and epoch1 != epoch0


def test_bad_inputs():
    with pytest.raises(ValueError, match="empty"):
        PromptStream([], 1, 0)
    with pytest.raises(ValueError, match="exceeds"):
        PromptStream(["a"], 2, 0)
    s = PromptStream(["a", "b"], 1, 0)
    with pytest.raises(ValueError, match="cannot resume"):
        s.load_state_dict({"epoch": 0, "pos": 0, "n": 3, "seed": 0})
