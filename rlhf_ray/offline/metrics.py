"""Where an offline stage reports: a progress bar (ETA, loss), TensorBoard event files, a JSONL file."""
from __future__ import annotations

import json
import time
from pathlib import Path

from rlhf_ray.config.schema import LoggingConfig


class MetricsLogger:
    """`log(step, stats)` appends `{"step", "time", **stats}` to `metrics.jsonl` and TensorBoard scalars."""

    def __init__(self, out_dir: Path, cfg: LoggingConfig, *, total_steps: int, start_step: int, title: str):
        out_dir.mkdir(parents=True, exist_ok=True)
        self.cfg = cfg
        self._jsonl = open(out_dir / "metrics.jsonl", "a") if cfg.jsonl else None
        self._tb = None
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(str(out_dir / "tb"))
        self._progress = None
        if cfg.console:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)
            self._progress = Progress(TextColumn(f"[bold]{title}"), BarColumn(), MofNCompleteColumn(),
                                      TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                                      TextColumn("{task.fields[info]}"))
            self._task = self._progress.add_task(title, total=total_steps, completed=start_step, info="")
            self._progress.start()

    def log(self, step: int, stats: dict, *, advance: bool = True) -> None:
        if self._jsonl and (not advance or step % self.cfg.log_every == 0):
            self._jsonl.write(json.dumps({"step": step, "time": time.time(), **stats}) + "\n")
            self._jsonl.flush()
        if self._tb:
            for k, v in stats.items():
                self._tb.add_scalar(k, v, step)
        if self._progress:
            shown = {k: v for k, v in stats.items() if k in ("loss", "eval/loss", "eval/accuracy")}
            info = " ".join(f"{k}={v:.4f}" for k, v in shown.items())
            self._progress.update(self._task, advance=1 if advance else 0, info=info)

    def close(self) -> None:
        if self._progress:
            self._progress.stop()
        if self._tb:
            self._tb.close()
        if self._jsonl:
            self._jsonl.close()
