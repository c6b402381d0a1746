"""The operator's loop: say when reward stops improving, name the knobs, and let `--resume` turn them.

`PlateauDetector` watches the moving average of the training reward; when it has not improved by
`rl.plateau_min_delta` for `rl.plateau_window` steps it returns one console line with the signals that
explain a plateau (clip fraction, KL, entropy) and the overrides to try on `--resume`.

`check_resume_overrides` decides which config changes a resumed run accepts: the knobs below act on the
next step and touch no saved state; anything else (model, data, algorithm family, optimizer, whose state
is in the checkpoint) is refused by name before the run starts.
"""
from __future__ import annotations

import json
from collections import deque
from pathlib import Path
from typing import Optional

from rlhf_ray.config import Config, ConfigError

# Changeable on --resume: read fresh from the config on every step, saved nowhere else.
RESUME_SAFE = (
    "algorithm.clip_low", "algorithm.clip_high", "algorithm.dual_clip", "algorithm.entropy_coef",
    "algorithm.value_clip", "algorithm.value_coef", "algorithm.is_correction", "algorithm.is_cap",
    "algorithm.is_low", "algorithm.is_high", "rollout.sync.on_logprob_mismatch",
    # the names of is_correction / is_cap in run configs saved before the presets
    "algorithm.tis", "algorithm.tis_cap",
    "algorithm.dynamic_sampling", "algorithm.dynamic_sampling_max_rounds", "algorithm.overlong_buffer",
    "algorithm.overlong_penalty", "reference.kl_coef", "reference.kl_target", "reference.kl_horizon",
    "rl.steps", "rl.save_every", "rl.sample_every", "rl.eval_every", "rl.eval_samples", "rl.plateau_window",
    "rl.plateau_smoothing", "rl.plateau_min_delta", "logging", "cluster.address", "run.stages",
    # how batches are sampled ahead: a checkpoint's resume point (the prompts after the last batch trained) is the
    # same in every mode, and nothing sampled ahead is saved (rlhf_ray.rl.producer)
    "rollout.mode", "rollout.partial", "rollout.partial_chunk_tokens",
)
# Refused with a reason an operator can act on.
WHY_NOT = {
    "rl.policy.optim": "the optimizer and lr scheduler are restored from the checkpoint and keep their own "
                       "learning rate; start a new run with rl.init_from=<the checkpoint's exported policy>",
    "reference.kl_coef": "with reference.adaptive_kl=true the coefficient is the controller's restored state",
}


def _flat(d: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flat(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def _safe(key: str, cfg: Config) -> bool:
    if key == "reference.kl_coef" and cfg.reference.adaptive_kl:
        return False
    return any(key == s or key.startswith(s + ".") for s in RESUME_SAFE)


def changed_keys(saved: dict, cfg: Config) -> list[str]:
    before, now = _flat(saved), _flat(cfg.model_dump(mode="json"))
    return sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))


def resume_changes(path: Path, cfg: Config) -> list[str]:
    """The keys `cfg` changes against the config the run was started with (`path`, absent: none); a change
    that is not safe on resume is refused by name (preflight calls this before Ray starts)."""
    if not path.exists():
        return []
    keys = changed_keys(json.loads(path.read_text()), cfg)
    refused = [k for k in keys if not _safe(k, cfg)]
    if refused:
        reasons = sorted({why for k in refused for p, why in WHY_NOT.items() if k.startswith(p)})
        raise ConfigError(f"--resume cannot change {', '.join(refused)}: the checkpoint was trained with "
                          f"other values" + (f" ({'; '.join(reasons)})" if reasons else "")
                          + f". Changeable on resume: {', '.join(RESUME_SAFE)}")
    return keys


def check_resume_overrides(path: Path, cfg: Config, resume: bool) -> list[str]:
    """On resume, the accepted changes (for the console; unsafe ones are refused by name). Then record
    `cfg` as the run's config."""
    accepted = resume_changes(path, cfg) if resume else []
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg.model_dump(mode="json"), indent=1))
    return accepted


class PlateauDetector:
    """Moving average of `reward/score_mean` over `smoothing` steps; a plateau is `window` steps without
    a new best (by more than `min_delta`). It is announced once, then re-armed by the next improvement."""

    def __init__(self, cfg: Config):
        r = cfg.rl
        self.window, self.min_delta, self.cfg = r.plateau_window, r.plateau_min_delta, cfg
        self.recent: deque[float] = deque(maxlen=r.plateau_smoothing)
        self.best, self.best_step, self.announced = float("-inf"), 0, False

    def update(self, step: int, m: dict[str, float]) -> Optional[str]:
        reward = m.get("reward/score_mean")
        if not self.window or reward is None or reward != reward:
            return None
        self.recent.append(reward)
        if len(self.recent) < self.recent.maxlen:
            return None
        avg = sum(self.recent) / len(self.recent)
        if avg > self.best + self.min_delta:
            self.best, self.best_step, self.announced = avg, step, False
            return None
        if self.announced or step - self.best_step < self.window:
            return None
        self.announced = True
        return self._line(step, avg, m)

    def _line(self, step: int, avg: float, m: dict[str, float]) -> str:
        a, ref = self.cfg.algorithm, self.cfg.reference
        signals = "  ".join(f"{label} {m[k]:.4g}" for k, label in (
            ("policy/clip_frac", "clip_frac"), ("kl/mean", "kl"), ("policy/entropy", "entropy")) if k in m)
        wider = round(a.clip_high * 1.4, 3)
        return (f"reward plateau at step {step}: the {len(self.recent)}-step average {avg:+.3f} has not beaten "
                f"{self.best:+.3f} (step {self.best_step}) for {step - self.best_step} steps; {signals}. "
                f"Knobs for `rlhf-ray train CONFIG --resume KEY=VALUE`: algorithm.clip_high={wider} "
                f"(now {a.clip_high}; a low clip_frac means the clip is not what limits the update), "
                f"reference.kl_coef={ref.kl_coef / 2:g} (now {ref.kl_coef:g}; a KL near its limit holds the "
                f"policy back), algorithm.entropy_coef (now {a.entropy_coef:g}; falling entropy means "
                f"collapse). The learning rate (rl.policy.optim.lr) needs a new run from the exported policy.")
