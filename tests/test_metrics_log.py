"""A resumed stage's logs: the rows a killed run wrote past its checkpoint are dropped, from the metrics and the
samples alike, so that the steps run again are logged once (none doubled)."""
import json

from rlhf_ray.config import LoggingConfig
from rlhf_ray.tracking.metrics import MetricsLogger


def _rows(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_a_resume_keeps_the_metrics_and_samples_up_to_its_checkpoint_and_drops_a_torn_line(tmp_path):
    cfg = LoggingConfig(tensorboard=False)
    first = MetricsLogger(tmp_path, cfg, "rl")
    for step in (1, 2, 3):
        first.log(step, {"reward/score_mean": float(step)})
        first.log_samples(step, [f"p{step}"], [f"r{step}"], [0.5])
    first.close()
    with open(tmp_path / "samples.jsonl", "a") as f:
        f.write('{"step": 4, "prompt": "p4", "resp')      # the line being written when the run was killed

    resumed = MetricsLogger(tmp_path, cfg, "rl", resume=True)
    resumed.truncate_to(2)                                  # the checkpoint after step 2
    for step in (3, 4):
        resumed.log(step, {"reward/score_mean": 10.0 + step})
        resumed.log_samples(step, [f"again{step}"], [f"r{step}"], [0.5])
    resumed.close()
    assert [r["step"] for r in _rows(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]
    samples = _rows(tmp_path / "samples.jsonl")
    assert [(r["step"], r["prompt"]) for r in samples] == [(1, "p1"), (2, "p2"), (3, "again3"), (4, "again4")]
