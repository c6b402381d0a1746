"""What the operator watches: JSONL metrics, TensorBoard events, optional W&B, sample generations.

One `MetricsLogger` per stage; every sink receives the same flat `{name: float}` dict per step.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Iterable

from rlhf_ray.config import LoggingConfig


class MetricsLogger:
    def __init__(self, out_dir: str | Path, cfg: LoggingConfig, stage: str, run_config: dict | None = None,
                 resume: bool = False):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cfg, self.stage = cfg, stage
        self.jsonl_path = self.dir / "metrics.jsonl"
        self._jsonl = None
        if cfg.jsonl:
            self._jsonl = open(self.jsonl_path, "a" if resume else "w")
        self._tb = None
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(str(self.dir / "tb"))
        self._wandb = None
        if cfg.wandb_project:
            try:
                import wandb
            except ImportError:
                raise RuntimeError("logging.wandb_project is set but wandb is not installed "
                                   "(pip install wandb, or unset logging.wandb_project)") from None
            self._wandb = wandb.init(project=cfg.wandb_project, name=f"{stage}", config=run_config or {},
                                     dir=str(self.dir), resume="allow" if resume else None)
        self._samples = None  # opened on the first sample, so stages without samples leave no empty file
        self._resume = resume

    def truncate_to(self, step: int) -> None:
        """On resume from the checkpoint taken after `step`: keep the metrics and samples of steps <= step only (a
        killed run may have logged steps past its checkpoint; they are run, and logged, again)."""
        if self._jsonl is not None:
            self._jsonl.close()
            keep_steps_upto(self.jsonl_path, step)
            self._jsonl = open(self.jsonl_path, "a")
        if self._samples is not None:
            self._samples.close()
            self._samples = None  # opened again, for appending, by the next sample
        keep_steps_upto(self.dir / "samples.jsonl", step)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        clean = {k: float(v) for k, v in metrics.items() if v is not None}
        if self._jsonl:
            row = {"step": step, "time": time.time(),
                   **{k: (v if math.isfinite(v) else None) for k, v in clean.items()}}
            self._jsonl.write(json.dumps(row) + "\n")
            self._jsonl.flush()
        if self._tb:
            for k, v in clean.items():
                if math.isfinite(v):
                    self._tb.add_scalar(f"{self.stage}/{k}", v, step)
        if self._wandb:
            self._wandb.log({f"{self.stage}/{k}": v for k, v in clean.items()}, step=step)

    def log_samples(self, step: int, prompts: Iterable[str], responses: Iterable[str], scores: Iterable[float],
                    episodes: Iterable[dict] = ()):
        """episodes: with an environment, each row's episode statistics (turns, tool calls, tokens); its
        `response` is then the whole episode, the environment's replies included."""
        if self._samples is None:
            self._samples = open(self.dir / "samples.jsonl", "a" if self._resume else "w")
        episodes = list(episodes)
        for i, (p, r, s) in enumerate(zip(prompts, responses, scores)):
            row = {"step": step, "prompt": p, "response": r, "score": s}
            if i < len(episodes):
                row["episode"] = episodes[i]
            self._samples.write(json.dumps(row) + "\n")
        self._samples.flush()

    def close(self) -> None:
        if self._jsonl:
            self._jsonl.close()
        if self._tb:
            self._tb.flush()
            self._tb.close()
        if self._wandb:
            self._wandb.finish()
        if self._samples:
            self._samples.close()


def keep_steps_upto(path: Path, step: int) -> None:
    """Rewrite a JSON-lines file of step rows (metrics, samples) with the rows of steps <= `step`, whole or not at
    all; a last line that a kill cut short is dropped with the rows after the checkpoint."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:  # the line being written when the run was killed
            continue
        if row["step"] <= step:
            keep.append(line)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


def read_metrics(path: str | Path) -> list[dict]:
    p = Path(path)
    return [json.loads(ln) for ln in p.read_text().splitlines() if ln.strip()] if p.exists() else []
