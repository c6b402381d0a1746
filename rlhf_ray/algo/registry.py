"""One registry of RL algorithms: each name carries its estimator, loss aggregation and KL placement.

An algorithm here is a choice of (advantage estimator, policy objective, how the per-token loss is reduced,
where the KL to the reference goes, whether a critic is trained). The estimator is named by its key in
``advantages.ADVANTAGE_ESTIMATORS``; ``options`` maps the estimator's own keyword arguments to the
``algorithm.*`` config field that supplies each, so a caller builds the call from the spec alone:

    spec = ALGORITHMS[name]
    kwargs = {kw: getattr(algo_cfg, field) for kw, field in spec.options.items()}

No torch here: the config loader reads these defaults to resolve a config before anything heavy starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class AlgorithmSpec:
    name: str
    estimator: str                       # key of advantages.ADVANTAGE_ESTIMATORS
    loss_agg: str                        # key of aggregation.AGGREGATIONS: the paper's reduction
    kl_in_reward: bool                   # KL placement: in the token rewards (True) or as a loss term (False)
    kl_kind: str                         # key of kl.KL_ESTIMATORS suited to that placement
    uses_critic: bool = False            # trains a value model (GAE needs V(s_t))
    min_group_size: int = 1              # samples per prompt the estimator needs
    batch_whiten: bool = False           # whiten advantages over the batch afterwards (algorithm.whiten_advantages)
    options: dict[str, str] = field(default_factory=dict)  # estimator keyword -> algorithm.* field
    # algorithm.* fields the config leaves unset take these values (config.schema resolves them)
    defaults: dict[str, object] = field(default_factory=dict)
    # algorithm.overlong_buffer, when unset: this fraction of rollout.max_new_tokens (0: off)
    overlong_fraction: float = 0.0
    cite: str = ""
    objective: str = "ppo_clip"          # key of objectives.OBJECTIVES: the policy's loss


ALGORITHMS: dict[str, AlgorithmSpec] = {
    # InstructGPT (Ouyang 2022, eq. 2): per-token KL in the reward, GAE with a critic, batch-whitened.
    "ppo": AlgorithmSpec("ppo", "gae", "token-mean", True, "k1", uses_critic=True, batch_whiten=True,
                         cite="Schulman 2017; Ouyang 2022"),
    # GRPO (Shao 2024, eq. 3): 1/|o_i| per sequence, k3 KL as a loss term, group-normalised advantage.
    "grpo": AlgorithmSpec("grpo", "grpo", "seq-mean-token-mean", False, "k3", min_group_size=2,
                          options={"norm_by_std": "group_std_norm"}, cite="Shao 2024"),
    # Dr. GRPO (Liu 2025, sec. 3.1): no std division, and a constant length normaliser in the loss.
    "dr_grpo": AlgorithmSpec("dr_grpo", "dr_grpo", "seq-mean-token-sum-norm", False, "k3", min_group_size=2,
                             cite="Liu 2025"),
    # RLOO (Ahmadian 2024): a sequence-level REINFORCE with leave-one-out baseline, KL in the reward.
    "rloo": AlgorithmSpec("rloo", "rloo", "token-mean", True, "k1", min_group_size=2, cite="Ahmadian 2024"),
    # REINFORCE++ (Hu 2025, sec. 3): token-level KL in the reward, global whitening inside the estimator;
    # algorithm.baseline=group_mean is REINFORCE++-baseline (needs groups: validated in the config).
    "reinforce_pp": AlgorithmSpec("reinforce_pp", "reinforce_pp", "token-mean", True, "k1",
                                  options={"baseline": "baseline"}, cite="Hu 2025"),
    # DAPO (Yu 2025): GRPO's group-normalised advantage with dynamic sampling (sec. 3.2), clip-higher
    # eps_high=0.28 (sec. 3.1), a token-level loss (sec. 3.3) and the soft overlong penalty over the last
    # 4096 of 20480 tokens, a fifth of the limit (sec. 3.4). The paper also drops the KL term; that stays
    # reference.kl_coef's call (0 reproduces the paper; a short run on a small model drifts without it).
    "dapo": AlgorithmSpec("dapo", "grpo", "token-mean", False, "k3", min_group_size=2,
                          options={"norm_by_std": "group_std_norm"},
                          defaults={"dynamic_sampling": True, "clip_high": 0.28}, overlong_fraction=0.2,
                          cite="Yu 2025"),
    # GSPO (Zheng 2025): GRPO's group-normalised advantage, the clip on a sequence-level, length-normalised
    # ratio with the paper's ranges 3e-4 / 4e-4 (sec. 5.1), one loss per sequence averaged over the group.
    "gspo": AlgorithmSpec("gspo", "grpo", "seq-mean-token-mean", False, "k3", min_group_size=2,
                          options={"norm_by_std": "group_std_norm"},
                          defaults={"clip_low": 3e-4, "clip_high": 4e-4}, cite="Zheng 2025", objective="gspo"),
    # CISPO (MiniMax-M1, Chen 2025, sec. 3.1): group-normalised advantage, a clipped stop-gradient IS weight
    # times log pi, token-level mean. No lower bound on the weight (clip_low=1: the weight's floor is 0);
    # the paper tunes only the upper bound and reports no value: 0.28 here is DAPO's clip-higher, the value
    # open implementations default to.
    "cispo": AlgorithmSpec("cispo", "grpo", "token-mean", False, "k3", min_group_size=2,
                           options={"norm_by_std": "group_std_norm"},
                           defaults={"clip_low": 1.0, "clip_high": 0.28}, cite="Chen 2025", objective="cispo"),
}


# The train/inference mismatch corrections (algorithm.is_correction; rlhf_ray.algo.offpolicy): each preset's
# default band (low, high) where it masks by one, None where it uses only algorithm.is_cap (or nothing).
IS_CORRECTIONS: dict[str, tuple[float, float] | None] = {
    "none": None,
    "tis": None,               # token truncation at C
    "mis": None,               # sequence mask at C (Yao, Liu et al. 2025)
    "icepop": (0.5, 5.0),      # token band, both sides (Ring-1T's IcePop)
    "seq_mask_tis": (0.5, 2.0),  # band of each sequence's geometric-mean ratio, then token TIS
}


def get_algorithm(name: str) -> AlgorithmSpec:
    """The spec registered as ``name``; an unknown name is a ValueError listing the registered ones."""
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise ValueError(f"unknown algorithm {name!r}; allowed: {sorted(ALGORITHMS)}") from None


def estimator_kwargs(spec: AlgorithmSpec, settings: object) -> dict:
    """The estimator's own keyword arguments, read from ``settings`` (an AlgorithmConfig) by field name."""
    return {kw: getattr(settings, attr) for kw, attr in spec.options.items()}
