"""Environments as a user would write them (loaded as `envs_for_tests:Class`), good and bad."""
from rlhf_ray.envs.base import Reply


class TwoToolTurns:
    """Answers the first two turns with a tool observation, ends the third with reward = its length in characters
    (a deterministic reward that varies with what the policy wrote)."""

    def __init__(self, tools):
        self.tools, self.turns = tools, 0

    def reset(self, row):
        self.turns = 0

    def step(self, turn):
        self.turns += 1
        if self.turns < 3:
            result = self.tools["calculator"]("6 * 7") if "calculator" in self.tools else None
            return Reply("tool", "obs " + (result.text if result else "-"), tool_calls=1)
        return Reply("done", reward=float(len(turn)))


class AlwaysTool:
    """Never ends by itself: rollout.max_turns or the token budget ends each episode."""

    def __init__(self, tools):
        pass

    def reset(self, row):
        pass

    def step(self, turn):
        return Reply("tool", "obs", tool_calls=1, tool_errors=1)


class ReturnsADict:
    def __init__(self, tools):
        pass

    def reset(self, row):
        pass

    def step(self, turn):
        return {"done": True, "reward": 1.0}


class RaisesOnReset:
    def __init__(self, tools):
        pass

    def reset(self, row):
        raise KeyError("solution")

    def step(self, turn):
        return Reply("done")


class NoStep:
    def __init__(self, tools):
        pass

    def reset(self, row):
        pass


not_a_class = 3
