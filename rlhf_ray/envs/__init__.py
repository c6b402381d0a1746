"""Environments: rollouts beyond one turn.

    base.py      the interface: an `Environment` answers each policy turn with a `Reply` (tool result, user turn,
                 or done with a reward); `Tools` it may call
    episode.py   the episode loop: every live episode's next turn in one generate call, the sampled token ids
                 kept and the environment's tokens appended after them (never the conversation re-tokenized)
    loader.py    `builtin:NAME` or `module:Class`, and the probe episode the preflight runs before Ray starts
    tools.py     the calculator and the Python executor, plain classes and their Ray shell
    sandbox.py   the executor's child process: time, memory and output limits, no network, a scratch folder
    rewards.py   verifiable rewards: the exact answer, tests that pass
    arith.py     the built-in arithmetic word problems (from a seed) and their calculator environment
    code.py      the built-in code environment: write a function, its tests decide the reward

Below `rl/` (the controller runs episodes through `episode.EpisodeRunner`), beside `roles/`; imports no Ray at
module level (the tools' Ray shell imports it when built).
"""
