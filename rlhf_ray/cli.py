"""`rlhf-ray`: the command line. Each subcommand loads and validates the config first, so a bad config
fails in a second with a one-paragraph message (no traceback) before Ray, vLLM or DeepSpeed start."""
from __future__ import annotations

import argparse
import sys

DESCRIPTION = """\
rlhf-ray: reinforcement learning from human feedback on Ray.

Every command takes a YAML config (see configs/) followed by overrides such as
rollout.temperature=0.7 or model.lora.enabled=true.

examples:
  rlhf-ray config configs/quickstart.yaml algorithm.name=ppo   # print the resolved config
  rlhf-ray train configs/quickstart.yaml                       # SFT -> reward model -> RL, locally
  rlhf-ray models build builtin:tiny                           # build or convert a built-in model
"""


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="YAML config file (omit for the built-in defaults)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")


def _load(args):
    from rlhf_ray.config import load_config
    config, overrides = args.config, list(args.overrides)
    if config and "=" in config and not config.endswith((".yaml", ".yml")):
        config, overrides = None, [config] + overrides  # only overrides were given
    return load_config(config, overrides)


def cmd_config(args) -> int:
    from rlhf_ray.config import dump_config
    print(dump_config(_load(args)), end="")
    return 0


def cmd_models(args) -> int:
    from rlhf_ray.models.kit import BUILDERS, BUILTIN, resolve_model_path
    if args.action == "list":
        for name in BUILDERS:
            print(BUILTIN + name)
        return 0
    for spec in args.names or [BUILTIN + "tiny"]:
        print(f"{spec} -> {resolve_model_path(spec)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhf-ray", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("config", help="validate a config and print it fully resolved")
    _add_config_args(p)
    p.set_defaults(func=cmd_config)
    p = sub.add_parser("models", help="list built-in models, or build them into the local cache")
    p.add_argument("action", choices=["list", "build"])
    p.add_argument("names", nargs="*", help="e.g. builtin:tiny builtin:smollm2-135m")
    p.set_defaults(func=cmd_models)
    for register in _extensions():
        register(sub, _add_config_args, _load)
    return parser


def _extensions():
    """Subcommands that live beside their capability (training, serving); each adds its own parser."""
    from rlhf_ray import commands
    return commands.REGISTER


def main(argv: list[str] | None = None) -> int:
    from rlhf_ray.config import ConfigError
    from rlhf_ray.errors import RunError, unwrap
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"rlhf-ray: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - errors meant for the operator are printed, the rest re-raised
        cause = unwrap(e)
        if isinstance(cause, (RunError, FileNotFoundError)):
            print(f"rlhf-ray: error: {type(cause).__name__}: {cause}", file=sys.stderr)
            if getattr(cause, "detail", ""):  # the user's own traceback (their reward function), never Ray's
                print(cause.detail, file=sys.stderr)
            return 1
        raise

if __name__ == "__main__":
    sys.exit(main())
