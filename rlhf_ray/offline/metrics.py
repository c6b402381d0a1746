"""Where an offline stage reports: a progress bar (ETA, loss) over the shared metric sinks
(`rlhf_ray.tracking.metrics`: JSONL, TensorBoard, optional W&B)."""
from __future__ import annotations

from pathlib import Path

from rlhf_ray.config.schema import LoggingConfig
from rlhf_ray.tracking.metrics import MetricsLogger as Sinks


class StageLog:
    """`log(step, stats)` writes `{"step", **stats}` to every sink and advances the progress bar. A resumed
    stage first drops what a killed run logged after its checkpoint, so every step is logged once."""

    def __init__(self, out_dir: Path, cfg: LoggingConfig, *, total_steps: int, start_step: int, title: str):
        self.cfg, self.title = cfg, title
        self.sinks = Sinks(out_dir, cfg, stage=title, resume=start_step > 0)
        if start_step > 0:
            self.sinks.truncate_to(start_step)
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
        if not advance or step % self.cfg.log_every == 0:
            self.sinks.log(step, stats)
        if self._progress:
            shown = {k: v for k, v in stats.items() if k in ("loss", "eval/loss", "eval/accuracy")}
            info = " ".join(f"{k}={v:.4f}" for k, v in shown.items())
            self._progress.update(self._task, advance=1 if advance else 0, info=info)

    def restart(self, start_step: int) -> None:
        """A worker group restarted from the checkpoint of `start_step`: steps after it are logged again."""
        self.sinks.truncate_to(start_step)
        if self._progress:
            self._progress.update(self._task, completed=start_step)

    def close(self) -> None:
        if self._progress:
            self._progress.stop()
        self.sinks.close()
