"""An encoder reward model (BERT-style `classifier` on the pooled first token, as MiniLM) trains in the
learner: its score is the model's own pooled logit, not a per-token head read at the last token, and the
RM stage's Bradley-Terry step (`rlhf_ray.offline.stages.rm_step_loss`) teaches it a separable preference."""
import pytest
import torch

pytestmark = pytest.mark.slow

GOOD, BAD = 10, 11  # the chosen response carries GOOD where the rejected one carries BAD; all else is shared


@pytest.fixture
def encoder_rm(tmp_path):
    """A fresh 1-layer BERT sequence classifier (num_labels=1) in a Learner of kind "reward"."""
    from tokenizers import Tokenizer, models
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    from rlhf_ray.config.schema import ModelConfig
    from rlhf_ray.learner.learner import Learner
    from rlhf_ray.utils.device import resolve_backend
    from tests.learner.helpers import learner_cfg

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                     num_labels=1, pad_token_id=0)
    BertForSequenceClassification(cfg).save_pretrained(tmp_path)
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"[PAD]": 0, "[UNK]": 1}, "[UNK]")),
                                  pad_token="[PAD]", unk_token="[UNK]")
    tok.save_pretrained(tmp_path)
    return Learner(ModelConfig(path=str(tmp_path)), learner_cfg(lr=1e-2), kind="reward", init_path=str(tmp_path),
                   backend=resolve_backend("cpu"), total_updates=STEPS, seed=0)


def test_encoder_reward_model_scores_with_its_own_pooling(encoder_rm):
    learner = encoder_rm
    ids = torch.tensor([[2, 5, 9, 3, 0], [2, 7, 3, 0, 0]])
    mask = (ids != 0).long()
    learner.ds_engine.eval()
    with torch.no_grad():
        got = learner.forward_scores(ids, mask)
        want = learner.hf_model(input_ids=ids, attention_mask=mask).logits[:, 0]
    assert got.shape == (2,) and torch.equal(got, want)


STEPS = 30


def pairs(n: int, seed: int) -> dict:
    """n preference pairs of 6 tokens, right-padded to 8: random context (20..63), GOOD vs BAD at a random
    position; chosen and rejected share the padding, as the RM stage's collate gives them."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(20, 64, (n, 8), generator=g)
    ids[:, 6:] = 0
    at = torch.randint(0, 6, (n,), generator=g)
    chosen, rejected = ids.clone(), ids.clone()
    chosen[torch.arange(n), at], rejected[torch.arange(n), at] = GOOD, BAD
    mask = (ids != 0).long()
    return {"chosen_ids": chosen, "chosen_mask": mask, "rejected_ids": rejected, "rejected_mask": mask.clone()}


def test_encoder_reward_model_learns_a_separable_preference(encoder_rm):
    from rlhf_ray.offline.stages import rm_step_loss
    from tests.learner.helpers import split

    learner = encoder_rm
    held_out = pairs(32, seed=99)

    def evaluate() -> dict:
        """Held-out Bradley-Terry loss, accuracy and mean margin, from the scores themselves."""
        learner.ds_engine.eval()
        with torch.no_grad():
            diff = (learner.forward_scores(held_out["chosen_ids"], held_out["chosen_mask"])
                    - learner.forward_scores(held_out["rejected_ids"], held_out["rejected_mask"]))
        return {"loss": float(-torch.nn.functional.logsigmoid(diff).mean()),
                "accuracy": float((diff > 0).float().mean()), "margin": float(diff.mean())}

    before = evaluate()
    for step in range(STEPS):
        learner.train_step(rm_step_loss, split(pairs(8, seed=step), size=4))
    after = evaluate()
    # untrained, the score does not tell GOOD from BAD (loss log 2 = 0.693, margin about 0; measured 0.693,
    # -6e-5); trained, it ranks every held-out pair by a wide margin (measured: loss 0.0023, margin 6.1)
    assert before["loss"] > 0.65 and abs(before["margin"]) < 0.1, before
    assert after["accuracy"] == 1.0, (before, after)
    assert after["loss"] < 0.1 and after["margin"] > 2.0, (before, after)
