"""Subcommands beyond `config` and `models`, each registered by the capability that provides it.

Each entry is `register(subparsers, add_config_args, load_config_fn)`; kept as an explicit list so a
reader sees every command the CLI has in one place.
"""
from rlhf_ray import cli_run

REGISTER: list = [cli_run.register]

from rlhf_ray.offline import cli as offline_cli  # noqa: E402  (sft, rm)

REGISTER.append(offline_cli.register)

from rlhf_ray.placement import report as plan_cli  # noqa: E402  (plan)

REGISTER.append(plan_cli.register)
