"""`rlhf-ray train`: the stages a config asks for, each reusing the previous stage's output.

    sft  (model.path)                       -> <output_dir>/sft/model
    rm   (rm.init_from or the SFT model)    -> <output_dir>/rm/model
    dpo  (dpo.init_from or the SFT model)   -> <output_dir>/dpo/model
    rl   (rl.init_from or the DPO / SFT model; reward `stage:rm`) -> <output_dir>/rl/model

sft, rm and dpo run on Ray Train (consecutive ones asking for the same workers in one run). A stage whose
`model/` is complete is not run again with `--resume`; an interrupted stage resumes from its latest
checkpoint (offline: Ray Train's; RL: its own). Paths `stage:sft` / `stage:rm` in the config name these outputs.
"""
from __future__ import annotations

import json
import re
import signal
import time
from pathlib import Path

from rlhf_ray.config import Config, save_config
from rlhf_ray.learner.checkpoint import is_complete
from rlhf_ray.models.kit import resolve_model_path


class StageOutputs:
    def __init__(self, root: Path):
        self.root = root

    def final(self, stage: str) -> Path:
        return self.root / stage / "model"

    def resolve(self, spec: str) -> str:
        if spec.startswith("stage:"):
            stage = spec[len("stage:"):]
            path = self.final(stage)
            if not is_complete(path):
                raise FileNotFoundError(f"{spec!r} refers to the {stage} stage's output {path}, which does not "
                                        f"exist yet: run that stage first or give a model folder")
            return str(path)
        return resolve_model_path(spec)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during a run, raised once Ray is shut down; `str()` is the one line for the
    console: the stage and the last step it logged, and how to continue. `code`: the exit status a shell
    gives a process ended by that signal (130, 143)."""

    def __init__(self, line: str, signum: int):
        super().__init__(line)
        self.code = 128 + signum


def run_pipeline(cfg: Config, resume: bool = False) -> dict[str, str]:
    from rlhf_ray.runtime import ray_session

    root = Path(cfg.run.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    save_config(cfg, root / "config.yaml")
    outs = StageOutputs(root)
    results: dict[str, str] = {}
    policy = cfg.model.path
    t0 = time.time()
    running: tuple[str, ...] = ()  # the stages under way (consecutive offline stages run together)
    try:
        offline = [stage for stage in ("sft", "rm", "dpo") if stage in cfg.run.stages]
        # a local RL-only run starts no Ray Train stage, so no dashboard for one (3 s of each start)
        with ray_session(cfg.cluster, dashboard=bool(offline)):
            from rlhf_ray.offline.stages import run_offline_stages
            done = tuple(stage for stage in offline if resume and is_complete(outs.final(stage)))
            running = tuple(stage for stage in offline if stage not in done)
            ran = run_offline_stages(cfg, offline, skip=done, fresh=not resume)
            results |= {stage: str(ran.get(stage, outs.final(stage))) for stage in offline}
            policy = results.get("dpo", results.get("sft", policy))  # RL continues from the last policy stage
            if "rl" in cfg.run.stages:
                from rlhf_ray.rl.run import run_rl
                running = ("rl",)
                start = outs.resolve(cfg.rl.init_from) if cfg.rl.init_from else policy
                results["rl"] = str(run_rl(cfg, start, outs.resolve, root / "rl", resume=resume))
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (runtime.Terminated); Ray is shut down by now
        signum = getattr(e, "signum", signal.SIGINT)
        raise Interrupted(stopped_line(cfg, running, t0, signum), signum) from None
    results["wall_time_s"] = f"{time.time() - t0:.1f}"
    return results


def stopped_line(cfg: Config, running: tuple[str, ...], since: float, signum: int) -> str:
    """Where an interrupted run stopped (the stage whose metrics were written last since `since`, and its
    last logged step) and what `--resume` will do from what is on disk."""
    root = Path(cfg.run.output_dir)
    written = [(f.stat().st_mtime, stage) for stage in running
               if (f := root / stage / "metrics.jsonl").is_file() and f.stat().st_mtime >= since]
    stage = max(written)[1] if written else (running[0] if running else None)
    how = "Ctrl-C (SIGINT)" if signum == signal.SIGINT else f"{signal.Signals(signum).name}"
    if stage is None:
        return f"stopped by {how} before any stage started; rerun the same command to start again"
    step = _last_step(root / stage / "metrics.jsonl") if written else None
    where = f"in stage {stage} " + (f"after step {step}" if step else "before its first step")
    ckpt = _latest_checkpoint_step(cfg, stage)
    if ckpt is not None:
        todo = f"rerun with --resume to continue {stage} from its checkpoint of step {ckpt}"
    else:
        from rlhf_ray.preflight import resume_points
        finished = [s for s in cfg.run.stages if is_complete(root / s / "model")]
        keep = f"keep the finished {', '.join(finished)} and " if finished else ""
        todo = (f"rerun with --resume to {keep}start {stage} again (no checkpoint of it yet)" if resume_points(cfg)
                else "nothing is saved to resume from yet: rerun the same command to start again")
    return f"stopped by {how} {where}; {todo}"


def _last_step(metrics: Path) -> int | None:
    lines = [x for x in metrics.read_text().splitlines() if x.strip()]
    try:
        return int(json.loads(lines[-1])["step"]) if lines else None
    except (ValueError, KeyError, TypeError):  # a line cut short by the interruption
        return None


def _latest_checkpoint_step(cfg: Config, stage: str) -> int | None:
    """The newest complete checkpoint `--resume` would continue `stage` from (RL's own `step_N` folders,
    an offline stage's `<stage>-step_N` in its Ray Train run)."""
    from rlhf_ray.preflight import resume_points
    rl_root = Path(cfg.run.output_dir) / "rl" / "checkpoints"
    steps = [int(m.group(1)) for p in resume_points(cfg)
             if (m := re.fullmatch(r"step_(\d+)" if stage == "rl" else rf"{stage}-step_(\d+)", p.name))
             and (stage != "rl" or p.parent == rl_root)]
    return max(steps) if steps else None

