"""End to end through the real CLI: `rlhf-ray sft` then `rlhf-ray rm` on the built-in task, tiny models."""
from __future__ import annotations

import json

import pytest

from rlhf_ray.cli import main

pytestmark = pytest.mark.slow


def _metrics(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_sft_then_rm_save_models_that_load_and_rm_beats_chance(tmp_path, ray_local):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    common = [f"run.output_dir={tmp_path}", "data.num_samples=600", "cluster.torch_threads=2",
              "logging.console=false"]
    assert main(["sft", *common, "sft.max_steps=20", "sft.save_every=10", "sft.learner.optim.lr=3e-3"]) == 0
    sft = tmp_path / "sft"
    rows = _metrics(sft / "metrics.jsonl")
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 20 and losses[-1] < 0.5 * losses[0]
    assert any("eval/loss" in r for r in rows)
    assert (tmp_path / "run-sft" / "sft-step_000010" / "COMPLETE").exists()  # Ray Train kept it in the run folder
    assert list((sft / "tb").glob("events.out.tfevents.*"))
    AutoModelForCausalLM.from_pretrained(sft / "model")

    assert main(["rm", *common, "rm.max_steps=40", "rm.learner.optim.lr=1e-3"]) == 0
    rm_rows = _metrics(tmp_path / "rm" / "metrics.jsonl")
    final_eval = [r for r in rm_rows if "eval/accuracy" in r][-1]
    assert final_eval["eval/rows"] >= 50
    assert final_eval["eval/accuracy"] > 0.75, final_eval  # chance is 0.5
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm" / "model")
    assert model.config.num_labels == 1


def test_bad_data_path_is_a_one_line_error(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a"}\n')
    code = main(["sft", f"run.output_dir={tmp_path}", f"data.sft={bad}"])
    err = capsys.readouterr().err
    assert code == 1 and f"{bad}:2" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err  # one line that names the row
