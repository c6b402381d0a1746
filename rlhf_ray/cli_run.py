"""CLI commands that run the product: `train` (the pipeline, local or on a cluster) and `serve`."""
from __future__ import annotations

import argparse
import json
import os
import signal
import time
from pathlib import Path


class ResumeFlag(argparse.Action):
    """`--resume` or `--resume=auto`. argparse hands a bare `--resume` the next word (the config file)
    as its value: that word goes back in front of the positionals."""

    def __call__(self, parser, namespace, value, option_string=None):
        if value in (None, "required", "auto"):
            setattr(namespace, self.dest, value or "required")
        elif "=" in value or value.endswith((".yaml", ".yml")) or os.path.exists(value):
            setattr(namespace, self.dest, "required")
            namespace.resume_spill = value
        else:
            parser.error(f"--resume takes no value or =auto, got {value!r}")


def _unspill(args) -> None:
    spill = getattr(args, "resume_spill", None)
    if not spill:
        return
    if args.config is None:
        args.config = spill
    elif spill.endswith((".yaml", ".yml")):  # `--resume CONFIG k=v`: the config came first
        args.config, args.overrides = spill, [args.config, *args.overrides]
    else:  # `CONFIG [k=v ...] --resume k=v`
        args.overrides = [*args.overrides, spill]


def cmd_train(args, load) -> int:
    from rlhf_ray.pipeline import run_pipeline
    from rlhf_ray.preflight import preflight, resume_wanted
    _unspill(args)
    cfg = load(args)  # validated before Ray starts
    resume = resume_wanted(cfg, args.resume)
    preflight(cfg)  # every input knowable before Ray starts
    results = run_pipeline(cfg, resume=resume)
    print(json.dumps(results, indent=2))
    return 0


def cmd_serve(args, load) -> int:
    from ray import serve

    from rlhf_ray.models.kit import resolve_model_path
    from rlhf_ray.pipeline import StageOutputs
    from rlhf_ray.runtime import ray_session
    from rlhf_ray.serve.deploy import policy_application, reward_application
    from rlhf_ray.utils.device import resolve_backend

    cfg = load(args)
    outs = StageOutputs(Path(cfg.run.output_dir))
    backend = resolve_backend(cfg.cluster.device, cfg.model.dtype)
    with ray_session(cfg.cluster):
        serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
        if args.what == "policy":
            model = outs.resolve(cfg.serve.model or "stage:rl")
            serve.run(policy_application(model, cfg.serve, backend), name="policy", route_prefix="/")
            what = f"policy {model} as '{cfg.serve.model_name}' (OpenAI API: /v1/completions, /v1/chat/completions)"
        else:
            serve.run(reward_application(cfg.reward, outs.resolve, backend.device), name="reward", route_prefix="/")
            what = "reward service (POST /score)"
        print(f"serving {what} at http://{cfg.serve.host}:{cfg.serve.port}  (Ctrl-C to stop)", flush=True)
        stop = []
        signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
        try:
            while not stop and (args.seconds <= 0 or time.time() < args._deadline):
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
        serve.shutdown()
    return 0


def register(sub, add_config_args, load) -> None:
    p = sub.add_parser("train", help="run the pipeline the config asks for (SFT -> reward model -> RL) on Ray")
    add_config_args(p)
    p.add_argument("--resume", nargs="?", const="required", default=None, action=ResumeFlag,
                   help="skip finished stages and continue from the latest checkpoint; refuses when there is "
                        "none, unless --resume=auto (start fresh then: for job retries)")
    p.set_defaults(func=lambda a: cmd_train(a, load))
    p = sub.add_parser("serve", help="serve the trained policy (OpenAI-compatible) or the reward model over HTTP")
    add_config_args(p)
    p.add_argument("--what", choices=["policy", "reward"], default="policy")
    p.add_argument("--seconds", type=float, default=0, help="stop after this many seconds (0: until Ctrl-C)")

    def run(a):
        a._deadline = time.time() + a.seconds
        return cmd_serve(a, load)
    p.set_defaults(func=run)
