"""An encoder reward model (BERT-style `classifier` on the pooled first token, as MiniLM) trains in the
learner: its score is the model's own pooled logit, not a per-token head read at the last token."""
import pytest
import torch

pytestmark = pytest.mark.slow


def test_encoder_reward_model_scores_with_its_own_pooling(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    from rlhf_ray.config.schema import ModelConfig
    from rlhf_ray.learner.learner import Learner
    from tests.learner.helpers import learner_cfg
    from rlhf_ray.utils.device import resolve_backend

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                     num_labels=1, pad_token_id=0)
    BertForSequenceClassification(cfg).save_pretrained(tmp_path)
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"[PAD]": 0, "[UNK]": 1}, "[UNK]")),
                                  pad_token="[PAD]", unk_token="[UNK]")
    tok.save_pretrained(tmp_path)
    learner = Learner(ModelConfig(path=str(tmp_path)), learner_cfg(), kind="reward", init_path=str(tmp_path),
                      backend=resolve_backend("cpu"), total_steps=1)
    ids = torch.tensor([[2, 5, 9, 3, 0], [2, 7, 3, 0, 0]])
    mask = (ids != 0).long()
    learner.engine.eval()
    with torch.no_grad():
        got = learner.forward_scores(ids, mask)
        want = learner.hf_model(input_ids=ids, attention_mask=mask).logits[:, 0]
    assert got.shape == (2,) and torch.equal(got, want)
