"""`rlhf-ray sft CONFIG [overrides]` and `rlhf-ray rm CONFIG [overrides]`."""
from __future__ import annotations


def _ray_up(cfg) -> bool:
    """Start (or join) Ray for this command; True when this command started it and must stop it."""
    import ray
    if ray.is_initialized():
        return False
    c = cfg.cluster
    if c.address == "local":
        ray.init(num_cpus=c.cpus_per_node, include_dashboard=False, log_to_driver=True)
    else:
        ray.init(address=c.address)
    return True


def _run(stage: str):
    def cmd(args) -> int:
        import ray

        from rlhf_ray.offline.stages import prepare, run_rm, run_sft
        cfg = args.load(args)
        data = prepare(cfg, stage)
        started = _ray_up(cfg)
        try:
            out = (run_sft if stage == "sft" else run_rm)(cfg, fresh=args.fresh, data=data)
        finally:
            if started:
                ray.shutdown()
        print(f"{stage}: saved {out}")
        return 0
    return cmd


def register(sub, add_config_args, load) -> None:
    helps = {"sft": "supervised fine-tuning of the policy on prompt/response data",
             "rm": "train a reward model on preference pairs (reports held-out pairwise accuracy)"}
    for stage, text in helps.items():
        p = sub.add_parser(stage, help=text)
        add_config_args(p)
        p.add_argument("--fresh", action="store_true",
                       help="ignore checkpoints in the output folder (default: resume from the latest)")
        p.set_defaults(func=_run(stage), load=load)
