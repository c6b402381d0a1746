"""Which rlhf_ray files one RL step runs code in: the driver and every role process, step 2 of a tiny run.

    python benchmarks/step_files.py colocated|distributed [--source DIR]

A profile hook records the `rlhf_ray` source file of every Python call: in the driver, and in every Ray
worker (installed by Ray's `worker_process_setup_hook`; Ray runs actor methods on threads it starts in C++,
so the hook is also turned on by the actor-method executor in whichever thread runs a method). Step 1 warms
up (first-call imports); the files of step 2 are counted. `--source` runs another checkout's rlhf_ray (its
folder holding `rlhf_ray/`), e.g. `git archive REV rlhf_ray | tar -x -C DIR` to count an older revision.
docs/ARCHITECTURE.md reports the counts.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading

SEEN: set[str] = set()
_ROOT = os.sep + "rlhf_ray" + os.sep


def _hook(frame, event, arg):
    if event == "call":
        f = frame.f_code.co_filename
        i = f.find(_ROOT)
        if i >= 0:
            SEEN.add(f[i + 1:])


def install() -> None:
    """Ray's worker_process_setup_hook (and the driver's): profile this thread, new threads, actor methods."""
    sys.setprofile(_hook)
    threading.setprofile(_hook)
    from ray._private import function_manager as fm
    make = fm.FunctionActorManager._make_actor_method_executor
    if getattr(make, "traced", False):
        return

    def traced(self, method_name, method):
        executor = make(self, method_name, method)

        def run(*args, **kwargs):
            if sys.getprofile() is not _hook:
                sys.setprofile(_hook)
            return executor(*args, **kwargs)
        run.name, run.method = executor.name, executor.method
        return run
    traced.traced = True
    fm.FunctionActorManager._make_actor_method_executor = traced


def reset(_actor=None) -> None:
    SEEN.clear()


def seen(_actor=None) -> list[str]:
    return sorted(SEEN)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("placement", choices=["colocated", "distributed"])
    ap.add_argument("--source", default="", help="a folder holding the rlhf_ray to count (default: this one)")
    args = ap.parse_args()
    source = os.path.abspath(args.source) if args.source else ""
    path = os.pathsep.join(p for p in (source, os.path.dirname(os.path.abspath(__file__))) if p)
    sys.path[:0] = path.split(os.pathsep)
    os.environ["PYTHONPATH"] = path   # the raylet and its workers inherit it
    os.chdir(tempfile.mkdtemp())      # Ray puts the driver's folder first on a worker's path: not a checkout
    import ray
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"worker_process_setup_hook": "step_files.install", "env_vars": {"PYTHONPATH": path}})
    import step_files as me  # the module the workers import, so the driver's set is the same object kind
    from transformers import AutoTokenizer

    from rlhf_ray.config import load_config
    from rlhf_ray.data.prompts import load_prompts
    from rlhf_ray.models.kit import resolve_model_path
    from rlhf_ray.placement.groups import release, reserve
    from rlhf_ray.rl.controller import RLController, StepConfig
    from rlhf_ray.rl.prompt_stream import PromptStream
    try:
        from rlhf_ray.placement.graph import build_roles
        from rlhf_ray.placement.groups import check_fits
        from rlhf_ray.placement.shared import Paths
    except ImportError:  # before the roles/ and placement/ rooms (c08b92e)
        from rlhf_ray.rl.resources import check_fits
        from rlhf_ray.rl.roles import Paths, build_roles
    cfg = load_config(None, ["run.stages=[rl]", "reward.sources=[{kind: function, path: "
                             "'rlhf_ray.data.builtin_reviews:vader_reward'}]", f"cluster.placement={args.placement}",
                             "rl.prompts_per_step=4", "rollout.n_samples_per_prompt=4", "algorithm.mini_batch_size=16",
                             "rollout.max_new_tokens=8", "data.max_prompt_len=16"])
    init = resolve_model_path("builtin:tiny")
    plan = check_fits(cfg)
    groups = reserve(plan, timeout_s=120)
    roles = build_roles(cfg, Paths(init, resolve_model_path, tempfile.mkdtemp()), plan, groups, 10)
    try:
        tok = AutoTokenizer.from_pretrained(init)
        controller = RLController(StepConfig.of(cfg), roles, PromptStream(load_prompts(cfg.data, tok, 0), 4, 0),
                                  pad_id=tok.pad_token_id)
        controller.step()
        actors = [a for _, a in roles.processes()]
        ray.get([a.__ray_call__.remote(me.reset) for a in actors])
        me.install()
        me.reset()
        controller.step()
        sys.setprofile(None)
        files = set(me.seen()).union(*ray.get([a.__ray_call__.remote(me.seen) for a in actors]))
    finally:
        roles.shutdown()
        release(groups)
        ray.shutdown()
    print(f"{args.placement}: {len(files)} files")
    for f in sorted(files):
        print("  ", f)


if __name__ == "__main__":
    main()
