"""What both placements of an RL run share: the config sections the roles are built from, the run's paths
and the weights the generator and the critic start from (`rlhf_ray.placement.graph.build_roles` picks the
placement).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from rlhf_ray.config import (AlgorithmConfig, ModelConfig, ReferenceConfig, RewardConfig, RLConfig,
                             RolloutConfig)

if TYPE_CHECKING:
    from rlhf_ray.config import Config


@dataclass(frozen=True)
class RoleSections:
    """The config sections the RL roles are built from: a placement (and a colocated rank, which hosts every
    role of its device) reads these and the plan's `Construction`, never the whole `Config`."""
    model: ModelConfig           # every learner's model (LoRA, 4-bit base)
    rl: RLConfig                 # the policy's and critic's learner sections; where the critic starts
    algorithm: AlgorithmConfig   # the policy's and critic's losses
    reference: ReferenceConfig   # the frozen reference's path; the KL term
    reward: RewardConfig         # the reward scorer
    rollout: RolloutConfig       # the engines; temperature and max_new_tokens of log-probs and loss lengths
    seed: int                    # `run.seed`: the learners' initialisation
    uses_critic: bool            # the algorithm learns a value function (PPO)

    @classmethod
    def of(cls, cfg: "Config") -> "RoleSections":
        return cls(cfg.model, cfg.rl, cfg.algorithm, cfg.reference, cfg.reward, cfg.rollout, cfg.run.seed,
                   cfg.uses_critic)


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
