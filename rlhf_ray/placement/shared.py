"""What both placements of an RL run share: the run's paths and the weights the generator and the critic
start from (`rlhf_ray.placement.graph.build_roles` picks the placement).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

from rlhf_ray.config import ModelConfig, RLConfig


@dataclass(frozen=True)
class Paths:
    policy_init: str          # HF folder the policy (and reference) start from
    resolve: Callable[[str], str]  # resolves `stage:rm`, `builtin:...` and plain paths
    scratch: str              # run-local folder for files the roles hand each other


def generator_base(model: ModelConfig, paths: Paths, policy) -> str:
    """The weights the generator starts from. With a 4-bit (QLoRA) learner that is the learner's own
    dequantized NF4 base, not the original checkpoint: otherwise generator and learner run different
    functions (seen: log-probs off by up to 0.5) and the agreement check rightly stops the run.
    vLLM 0.32 has no bitsandbytes path, so the dequantized base is what it can run."""
    if not model.quantization.load_in_4bit:
        return paths.resolve(paths.policy_init)
    base = os.path.join(paths.scratch, "generator_base")
    policy.export_hf(base, merge_lora=True)  # adapter B = 0 at start: merged == base
    return base


def critic_init_path(rl: RLConfig, paths: Paths) -> str:
    """`rl.critic_init_from=stage:rm` starts the critic from the reward model (InstructGPT): the RM's score
    head is the value head (the same Llama `score` layer) and its backbone already judges responses."""
    return paths.resolve(rl.critic_init_from) if rl.critic_init_from else paths.policy_init
