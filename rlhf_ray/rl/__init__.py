"""The RL stage: controller, step records, role actors. The math lives in `rlhf_ray.algo`."""
