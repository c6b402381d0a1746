"""CLI commands that run the product: `train` (the pipeline, local or on a cluster), `serve` and `export`."""
from __future__ import annotations

import json


def cmd_train(args, load) -> int:
    from rlhf_ray.pipeline import run_pipeline
    cfg = load(args)  # validated before Ray starts
    results = run_pipeline(cfg, resume=args.resume)
    print(json.dumps(results, indent=2))
    return 0


def cmd_serve(args, load) -> int:
    from rlhf_ray.serve.run import serve_until_stopped
    serve_until_stopped(load(args), args.what, args.seconds)
    return 0


def register(sub, add_config_args, load) -> None:
    p = sub.add_parser("train", help="run the pipeline the config asks for (SFT -> reward model -> RL) on Ray")
    add_config_args(p)
    p.add_argument("--resume", action="store_true",
                   help="skip finished stages and continue RL from its latest checkpoint")
    p.set_defaults(func=lambda a: cmd_train(a, load))
    p = sub.add_parser("serve", help="serve the trained policy (OpenAI-compatible) or the reward model over HTTP")
    add_config_args(p)
    p.add_argument("--what", choices=["policy", "reward"], default="policy")
    p.add_argument("--seconds", type=float, default=0, help="stop after this many seconds (0: until Ctrl-C)")
    p.set_defaults(func=lambda a: cmd_serve(a, load))
    register_export(sub)


def cmd_export(args) -> int:
    from rlhf_ray.models.export import export
    for line in export(args.source, args.format, args.out, gguf_type=args.gguf_type):
        print(line)
    return 0


def register_export(sub) -> None:
    p = sub.add_parser("export", help="write a trained policy as a merged HF folder, a LoRA adapter, or GGUF for ollama")
    p.add_argument("source", metavar="RUN_OR_MODEL", help="a run folder, a model or adapter folder, or builtin:NAME")
    p.add_argument("--format", choices=["hf", "adapter", "gguf"], default="hf")
    p.add_argument("--gguf-type", choices=["f32", "f16", "q8_0"], default="f16", dest="gguf_type")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=cmd_export)
