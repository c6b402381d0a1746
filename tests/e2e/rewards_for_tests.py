"""Reward functions that misbehave on purpose (imported by the reward actor through PYTHONPATH)."""


def nan_reward(prompts, responses):
    return [float("nan") if i == 3 else 1.0 for i, _ in enumerate(responses)]


def raising_reward(prompts, responses):
    return [_score(r) for r in responses]


def _score(response):
    raise ValueError(f"cannot score {response[:10]!r}")


def string_reward(prompts, responses):
    return ["good" for _ in responses]


def short_reward(prompts, responses):
    return [1.0 for _ in responses[1:]]


_CALLS = [0]


def fails_on_second_call(prompts, responses):
    """Fine for the preflight probe (the driver's first call) and step 1 (the actor's first call)."""
    _CALLS[0] += 1
    if _CALLS[0] >= 2:
        return raising_reward(prompts, responses)
    return [float(len(r)) for r in responses]


def slow_vader(prompts, responses):
    """VADER, slowly: long enough in `score` for a test to kill the reward process mid-call."""
    import time

    from rlhf_ray.data.builtin_reviews import vader_reward
    time.sleep(1.0)
    return vader_reward(prompts, responses)


def slow_vader_one_nan(prompts, responses):
    """slow_vader, with a NaN for the fourth response of every call (reward.on_nonfinite=drop_group drops its
    group)."""
    scores = slow_vader(prompts, responses)
    return [float("nan") if i == 3 else x for i, x in enumerate(scores)]
