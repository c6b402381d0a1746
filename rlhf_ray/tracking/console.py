"""The live console view: a progress bar with ETA and the numbers an operator watches, one line per step."""
from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

WATCH = (("reward/score_mean", "reward", "{:+.3f}"), ("reward/gold_mean", "gold", "{:+.3f}"),
         ("kl/mean", "kl", "{:.4f}"), ("policy/clip_frac", "clip", "{:.3f}"), ("policy/entropy", "ent", "{:.2f}"),
         ("value/explained_var", "ev", "{:+.2f}"), ("throughput/tokens_per_s", "tok/s", "{:.0f}"),
         ("timing/step_s", "step", "{:.2f}s"))
PHASES = ("generate", "score", "advantage", "update", "sync")


def format_step(m: dict[str, float]) -> str:
    parts = [f"{label} {fmt.format(m[k])}" for k, label, fmt in WATCH if k in m]
    # an overlapped rollout was sampled during the previous update: its phase is only the driver's wait
    label = {"generate": "gen-wait"} if m.get("sync/overlapped") else {}
    phases = [f"{label.get(p, p)} {m[f'timing/{p}_s']:.2f}" for p in PHASES if f"timing/{p}_s" in m]
    return "  ".join(parts) + ("  [" + " ".join(phases) + "]" if phases else "")


class ConsoleView:
    def __init__(self, total: int, title: str, enabled: bool = True, start: int = 0):
        self.enabled = enabled
        import sys
        # A log file or CI pipe is not a terminal: do not wrap a step's line at 80 columns.
        self.console = Console(stderr=False, highlight=False, width=None if sys.stdout.isatty() else 240)
        self.progress = Progress(TextColumn(f"[bold]{title}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                                 console=self.console, disable=not enabled, transient=False)
        self.task = self.progress.add_task(title, total=total, completed=start)

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def step(self, step: int, metrics: dict[str, float]) -> None:
        if self.enabled:
            self.progress.console.print(f"step {step:4d}  {format_step(metrics)}", markup=False)
        self.progress.advance(self.task)

    def note(self, text: str) -> None:
        if self.enabled:
            self.progress.console.print(text)
