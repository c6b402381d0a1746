"""What the session's SFT + reward-model run (conftest.py `offline`, `train run.stages=[sft,rm]`) leaves behind:
per stage the step metrics with held-out evaluation, TensorBoard events, Ray Train's checkpoints in the run
folder, and a model folder that transformers loads; SFT's loss falls, the reward model beats chance on held-out
pairs. (The `rlhf-ray sft` / `rlhf-ray rm` commands run for real in e2e/test_offline_train.py.)"""
import pytest

from helpers import metrics

pytestmark = pytest.mark.slow


def test_sft_and_rm_write_metrics_events_checkpoints_and_loadable_models(offline):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    sft = metrics(offline / "sft")
    losses = [r["loss"] for r in sft if "loss" in r]
    assert len(losses) == 56 and sum(losses[-5:]) < 0.5 * sum(losses[:5]), losses
    assert any("eval/loss" in r for r in sft)
    for stage in ("sft", "rm"):
        assert list((offline / stage / "tb").glob("events.out.tfevents.*")), stage
        assert (offline / stage / "model" / "COMPLETE").exists(), stage
    # one Ray Train run for both stages; it keeps its two newest checkpoints, in the run folder, named by stage
    assert sorted(p.name for p in (offline / "quickstart-sft+rm").glob("*-step_*")) == [
        "rm-step_000020", "rm-step_000040"]
    assert all((p / "COMPLETE").exists() for p in (offline / "quickstart-sft+rm").glob("*-step_*"))
    AutoModelForCausalLM.from_pretrained(offline / "sft" / "model")
    final = [r for r in metrics(offline / "rm") if "eval/accuracy" in r][-1]
    assert final["eval/rows"] >= 50 and final["eval/accuracy"] > 0.75, final  # chance is 0.5
    assert AutoModelForSequenceClassification.from_pretrained(offline / "rm" / "model").config.num_labels == 1
