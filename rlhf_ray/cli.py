"""`rlhf-ray`: the command line, every command in this file, each a short function of its parsed arguments.

Each command loads and validates the config first, so a bad config fails in a second with a one-paragraph
message (no traceback) before Ray, vLLM or DeepSpeed start. Commands read their arguments and never
write to them.
"""
from __future__ import annotations

import argparse
import atexit
import json
import os
import signal
import sys
import threading

DESCRIPTION = """\
rlhf-ray: reinforcement learning from human feedback on Ray.

Every command takes a YAML config (see configs/) followed by overrides such as
rollout.temperature=0.7 or model.lora.enabled=true.

examples:
  rlhf-ray config configs/quickstart.yaml algorithm.name=ppo   # print the resolved config
  rlhf-ray train configs/quickstart.yaml                       # SFT -> reward model -> RL, locally
  rlhf-ray models build builtin:tiny                           # build or convert a built-in model
"""

OFFLINE_HELP = {"sft": "supervised fine-tuning of the policy on prompt/response data",
                "rm": "train a reward model on preference pairs (reports held-out pairwise accuracy)",
                "dpo": "direct preference optimization of the policy on preference pairs (frozen reference)"}


def load(args):
    """The validated config of `args.config` + `args.overrides` (a first argument with `=` is an override)."""
    from rlhf_ray.config import load_config
    config, overrides = args.config, list(args.overrides)
    if config and "=" in config and not config.endswith((".yaml", ".yml")):
        config, overrides = None, [config] + overrides  # only overrides were given
    return load_config(config, overrides)


# -- commands -------------------------------------------------------------------------------------
def cmd_config(args) -> int:
    from rlhf_ray.config import dump_config
    from rlhf_ray.preflight import check_plan
    cfg = load(args)
    if "rl" in cfg.run.stages:
        check_plan(cfg)  # the config validates; the RL roles must also place on the declared cluster
    print(dump_config(cfg), end="")
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


def cmd_train(args) -> int:
    from rlhf_ray.pipeline import Interrupted, run_pipeline
    from rlhf_ray.preflight import check_output_dir, preflight, resume_wanted
    cfg = load(args)  # validated before Ray starts
    if args.simulate or cfg.cluster.simulate:
        from rlhf_ray.placement.simulate import BANNER, simulated_config
        cfg = simulated_config(cfg, args.overrides)
        print(BANNER, flush=True)
    check_output_dir(cfg)
    from rlhf_ray.utils.capability import measured_dtype_line, slow_bf16_line
    if line := measured_dtype_line(cfg._measured) or slow_bf16_line(cfg.model.dtype, cfg.computes_on_cpu):
        print(line, flush=True)
    resume = resume_wanted(cfg, args.resume)
    preflight(cfg, resume=resume)  # every input knowable before Ray starts
    try:
        results = run_pipeline(cfg, resume=resume)
    except Interrupted as e:  # Ctrl-C or SIGTERM: where it stopped and how to continue, in one line
        print(f"rlhf-ray: {e}", file=sys.stderr)
        return e.code
    print(json.dumps(results, indent=2))
    return 0


def cmd_offline(args) -> int:
    """`sft` / `rm` / `dpo`: one offline stage on its own (resumes from the stage's checkpoints unless --fresh)."""
    from rlhf_ray.offline.stages import prepare, run_offline_stage
    from rlhf_ray.preflight import check_output_dir
    from rlhf_ray.runtime import ray_session
    cfg = load(args)
    check_output_dir(cfg)
    data = prepare(cfg, args.command)  # bad data fails before Ray starts
    with ray_session(cfg.cluster):
        out = run_offline_stage(cfg, args.command, fresh=args.fresh, data=data)
    print(f"{args.command}: saved {out}")
    return 0


def cmd_plan(args) -> int:
    from rlhf_ray.placement.report import print_plan
    return print_plan(load(args), as_json=args.json)  # a config that cannot be placed ends there, in one line


def cmd_export(args) -> int:
    from rlhf_ray.models.export import export
    for line in export(args.source, args.format, args.out, gguf_type=args.gguf_type):
        print(line)
    return 0


def cmd_serve(args) -> int:
    from rlhf_ray.serve.run import serve_until_stopped
    serve_until_stopped(load(args), args.what, args.seconds)
    return 0


# -- parser ---------------------------------------------------------------------------------------
def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="YAML config file (omit for the built-in defaults)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhf-ray", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("config", help="validate a config and print it fully resolved")
    _config_args(p)
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("models", help="list built-in models, or build them into the local cache")
    p.add_argument("action", choices=["list", "build"])
    p.add_argument("names", nargs="*", help="e.g. builtin:tiny builtin:smollm2-135m")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("train", help="run the pipeline the config asks for (SFT -> reward model -> RL) on Ray")
    _config_args(p)
    p.add_argument("--resume", choices=["required", "auto"], default=None,
                   help="skip finished stages and continue from the latest checkpoint; a bare --resume refuses "
                        "when there is none, --resume=auto starts fresh then (for job retries)")
    p.add_argument("--simulate", action="store_true",
                   help="run the config's cluster plan on a local Ray cluster of logical GPUs, every role "
                        "computing a tiny model of the same family on CPU (2 steps; see cluster.simulate)")
    p.set_defaults(func=cmd_train)

    for stage, text in OFFLINE_HELP.items():
        p = sub.add_parser(stage, help=text)
        _config_args(p)
        p.add_argument("--fresh", action="store_true",
                       help="ignore checkpoints in the output folder (default: resume from the latest)")
        p.set_defaults(func=cmd_offline)

    p = sub.add_parser("plan", help="place every role on the declared cluster and check each GPU's memory")
    _config_args(p)
    p.add_argument("--json", action="store_true",
                   help="print the plan as JSON: every process with its bundle, memory and construction arguments")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("serve", help="serve the trained policy (OpenAI-compatible) or the reward model over HTTP")
    _config_args(p)
    p.add_argument("--what", choices=["policy", "reward"], default="policy")
    p.add_argument("--seconds", type=float, default=0, help="stop after this many seconds (0: until Ctrl-C)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("export", help="write a trained policy as a merged HF folder, a LoRA adapter, or GGUF for ollama")
    p.add_argument("source", metavar="RUN_OR_MODEL", help="a run folder, a model or adapter folder, or builtin:NAME")
    p.add_argument("--format", choices=["hf", "adapter", "gguf"], default="hf")
    p.add_argument("--gguf-type", choices=["f32", "f16", "q8_0"], default="f16", dest="gguf_type")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    from rlhf_ray.config import ConfigError
    from rlhf_ray.errors import RunError, unwrap
    parser = build_parser()
    # a bare `--resume` means `--resume=required` (an optional value would swallow the config path)
    argv = ["--resume=required" if a == "--resume" else a for a in (sys.argv[1:] if argv is None else argv)]
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"rlhf-ray: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM under `entry` (`train` says more: where, how to resume)
        signum = getattr(e, "signum", signal.SIGINT)
        print(f"rlhf-ray: stopped by {signal.Signals(signum).name}", file=sys.stderr)
        return 128 + signum
    except Exception as e:  # noqa: BLE001 - errors meant for the operator are printed, the rest re-raised
        cause = unwrap(e)
        if isinstance(cause, (RunError, FileNotFoundError)):
            print(f"rlhf-ray: error: {type(cause).__name__}: {cause}", file=sys.stderr)
            if getattr(cause, "detail", ""):  # the user's own traceback (their reward function), never Ray's
                print(cause.detail, file=sys.stderr)
            return 1
        raise


def entry() -> None:
    """The `rlhf-ray` console script: `main`, then an exit that skips the interpreter's own teardown.

    After a run, Python's finalization (module teardown, the destructors of Ray's core worker and torch's
    thread pools) took 1.5 s on the 2-core machine with nothing left to do: every file is closed and Ray is
    shut down by then. The atexit handlers (logging, metric sinks) still run first, and a thread that is
    still working (not a daemon) is waited for as usual. SIGTERM stops a command as Ctrl-C does."""
    from rlhf_ray.runtime import stop_on_sigterm
    stop_on_sigterm()
    code = main()
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        sys.exit(code)
    atexit._run_exitfuncs()  # noqa: SLF001 - what a normal exit runs before finalization
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
