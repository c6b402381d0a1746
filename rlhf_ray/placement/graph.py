"""The role graph of an RL run: the placement `cluster.placement` asks for, composed from the roles.

    colocated    every role of a device in one process (`rlhf_ray.placement.colocated`)
    distributed  each role its own Ray actors (`rlhf_ray.placement.distributed`)

Both answer the controller's calls alike (`rlhf_ray.rl.roles.RoleGraph`), so the controller never asks which
placement it runs under. What each process is built with (device, dtype, engine and learner arguments, sync
mode, thread shares) is the plan's `rlhf_ray.placement.construct`; with the roles' config sections
(`rlhf_ray.placement.shared.RoleSections`) it is all a placement is given.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

from rlhf_ray.placement.construct import construct
from rlhf_ray.placement.plan import Plan
from rlhf_ray.placement.shared import Paths, RoleSections

if TYPE_CHECKING:
    from rlhf_ray.config import Config


def build_roles(cfg: "Config", paths: Paths, plan: Plan, groups: dict, total_updates: int):
    """The role graph `cluster.placement` asks for (a `rlhf_ray.rl.roles.RoleGraph`), every actor started with
    the options of its bundle in `plan` (reserved as `groups`, `rlhf_ray.placement.groups.reserve`).
    total_updates: optimizer steps the run's learners will take (their learning-rate schedule's length).
    The placement gets the roles' config sections and every process's construction arguments, the threads
    split from this node's cores."""
    built_with = (RoleSections.of(cfg), construct(cfg, plan, cores=os.cpu_count()))
    if cfg.cluster.placement == "colocated":
        from rlhf_ray.placement.colocated import ColocatedRoles
        return ColocatedRoles(*built_with, paths, plan, groups, total_updates)
    from rlhf_ray.placement.distributed import DistributedRoles
    return DistributedRoles(*built_with, paths, plan, groups, total_updates)
