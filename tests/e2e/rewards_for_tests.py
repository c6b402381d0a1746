"""Reward functions that misbehave on purpose (imported by the reward actor through PYTHONPATH)."""


def nan_reward(prompts, responses):
    return [float("nan") if i == 3 else 1.0 for i, _ in enumerate(responses)]
