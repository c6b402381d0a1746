"""End-of-run report: PNG plots of reward, KL and losses over steps, and a short markdown summary."""
from __future__ import annotations

from pathlib import Path

from rlhf_ray.tracking.metrics import read_metrics

PANELS = (
    ("reward", ("reward/score_mean", "reward/gold_mean")),
    ("held-out eval", ("eval/greedy_gold", "eval/sampled_gold", "eval/greedy_reward", "eval/sampled_reward")),
    ("KL to reference", ("kl/mean",)),
    ("policy loss", ("policy/loss",)),
    ("clip fraction", ("policy/clip_frac",)),
    ("entropy", ("policy/entropy",)),
    ("value loss", ("value/loss",)),
)


def write_report(run_dir: str | Path, title: str) -> Path | None:
    """Plot what metrics.jsonl holds; panels whose metrics are absent are left out. Returns the PNG path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir / "metrics.jsonl")
    if not rows:
        return None
    panels = [(name, [k for k in keys if any(k in r for r in rows)]) for name, keys in PANELS]
    panels = [(n, ks) for n, ks in panels if ks]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False)
    for ax, (name, keys) in zip(axes[0], panels):
        for k in keys:
            pts = [(r["step"], r[k]) for r in rows if r.get(k) is not None]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=k, marker=".")
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    out = run_dir / "report.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    first, last = rows[0], rows[-1]
    lines = [f"# {title}", "", f"steps: {first['step']} -> {last['step']}", ""]
    for k in ("reward/score_mean", "reward/gold_mean", "kl/mean", "timing/step_s", "eval/greedy_reward",
              "eval/greedy_gold", "eval/sampled_reward", "eval/sampled_gold", "eval/sampled_len"):
        have = [r for r in rows if r.get(k) is not None]  # eval rows are sparse: first and last evaluation
        if have:
            lines.append(f"- {k}: {have[0][k]:.4f} (step {have[0]['step']}) -> {have[-1][k]:.4f} (step {have[-1]['step']})")
    lines += ["", "![curves](report.png)", ""]
    (run_dir / "report.md").write_text("\n".join(lines))
    return out
