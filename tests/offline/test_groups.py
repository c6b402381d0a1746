"""Which offline stages share a Ray Train run, which stage a checkpoint folder belongs to, and a finished
stage's learner freed before the next one's."""
import pytest

from rlhf_ray.config import load_config
from rlhf_ray.offline.loop import stage_groups, train_run_location
from rlhf_ray.offline.worker import checkpoint_name, checkpoint_stage


def test_consecutive_stages_asking_for_the_same_workers_share_a_run():
    cfg = load_config(None, ["run.name=q"])
    assert stage_groups(cfg, ["sft", "rm", "dpo"]) == [["sft", "rm", "dpo"]]
    assert train_run_location(cfg, ["sft", "rm"])[1] == "q-sft+rm"


def test_a_stage_asking_for_other_workers_gets_a_run_of_its_own():
    for key in ("rm.learner.num_ranks=2", "rm.learner.cpus_per_rank=2", "rm.learner.gpus_per_rank=1",
                "rm.max_failures=3"):
        cfg = load_config(None, [key])
        assert stage_groups(cfg, ["sft", "rm", "dpo"]) == [["sft"], ["rm"], ["dpo"]], key
    cfg = load_config(None, ["rm.learner.num_ranks=2", "dpo.learner.num_ranks=2"])
    assert stage_groups(cfg, ["sft", "rm", "dpo"]) == [["sft"], ["rm", "dpo"]]


def test_a_checkpoint_folder_names_its_stage():
    assert checkpoint_name("rm", 40) == "rm-step_000040"
    assert checkpoint_stage("/storage/q-sft+rm/rm-step_000040") == "rm"
    assert checkpoint_stage(checkpoint_name("sft", 3)) == "sft"


@pytest.mark.slow  # builds DeepSpeed learners
@pytest.mark.parametrize("zero", [0, 2])
def test_a_finished_stages_learner_is_freed_before_the_next_stage_builds_its_own(zero):
    """Stages of one run train one after the other in the same worker process: the first stage's model and
    optimizer must not stay resident beside the second's. DeepSpeed's engine holds reference cycles (a
    collection frees them), and a ZeRO optimizer's gradient hooks a cycle through C++ (`Learner.close`)."""
    import weakref

    from rlhf_ray.algo import sft_loss
    from rlhf_ray.offline.worker import _free_memory
    from tests.learner.helpers import make_learner, split, token_batches

    def loss_fn(learner, mb):
        logits = learner.forward_logits(mb["input_ids"], mb["attention_mask"])
        return sft_loss(logits[:, :-1], mb["input_ids"][:, 1:], mb["loss_mask"][:, 1:])

    def stage():
        learner = make_learner(zero=zero)
        learner.train_step(loss_fn, split(token_batches(1)[0]))
        refs = weakref.ref(learner.model), weakref.ref(learner.ds_engine), weakref.ref(learner.ds_engine.optimizer)
        learner.close()
        return refs

    refs = stage()
    _free_memory()
    assert [ref() is None for ref in refs] == [True, True, True]


def test_a_zero3_stage_runs_alone():
    """DeepSpeed 0.19.8's ZeRO-3 engine outlives `destroy` (a reference no Python collector sees): a stage
    under ZeRO-3 gets worker processes of its own instead of leaving its model to the next stage's."""
    cfg = load_config(None, ["sft.learner.deepspeed.zero_stage=3", "rm.learner.deepspeed.zero_stage=3",
                             "dpo.learner.deepspeed.zero_stage=3"])
    assert stage_groups(cfg, ["sft", "rm", "dpo"]) == [["sft"], ["rm"], ["dpo"]]
    cfg = load_config(None, ["sft.learner.deepspeed.zero_stage=2", "rm.learner.deepspeed.zero_stage=2"])
    assert stage_groups(cfg, ["sft", "rm"]) == [["sft", "rm"]]
