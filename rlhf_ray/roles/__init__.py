"""The RL roles, each a plain class testable without Ray, with a short Ray shell beside it:

    policy      `roles.policy.PolicyWorker` (log-probs, reference log-probs under LoRA, PPO updates), `PolicyRank`
    critic      `roles.critic.CriticWorker` (values, the clipped value loss), `CriticRank`
    generator   `roles.generator.engine.GeneratorEngine` (vLLM), `GeneratorActor`, `GeneratorGroup`
    reference   `roles.reference.ReferenceScorer`, `ReferenceActor`
    reward      `roles.reward.RewardScorer`, `RewardActor`

The placements (`rlhf_ray.placement.colocated`, `rlhf_ray.placement.distributed`) compose them; a role never
imports `rl/` or `placement/`. The policy's and critic's loss glue: `roles.losses`.
"""
