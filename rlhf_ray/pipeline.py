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


def run_pipeline(cfg: Config, resume: bool = False) -> dict[str, str]:
    from rlhf_ray.runtime import ray_session

    root = Path(cfg.run.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    save_config(cfg, root / "config.yaml")
    outs = StageOutputs(root)
    results: dict[str, str] = {}
    policy = cfg.model.path
    t0 = time.time()
    with ray_session(cfg.cluster):
        from rlhf_ray.offline.stages import run_offline_stages
        offline = [stage for stage in ("sft", "rm", "dpo") if stage in cfg.run.stages]
        done = tuple(stage for stage in offline if resume and is_complete(outs.final(stage)))
        ran = run_offline_stages(cfg, offline, skip=done, fresh=not resume)
        results |= {stage: str(ran.get(stage, outs.final(stage))) for stage in offline}
        policy = results.get("dpo", results.get("sft", policy))  # RL continues from the last policy stage
        if "rl" in cfg.run.stages:
            from rlhf_ray.rl.run import run_rl
            start = outs.resolve(cfg.rl.init_from) if cfg.rl.init_from else policy
            results["rl"] = str(run_rl(cfg, start, outs.resolve, root / "rl", resume=resume))
    results["wall_time_s"] = f"{time.time() - t0:.1f}"
    return results

