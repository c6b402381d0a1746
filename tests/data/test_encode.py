"""Tokenizing rows: layouts with and without a chat template, and every truncation rule."""
from __future__ import annotations

import pytest
import torch

from rlhf_ray.data.encode import Limits, collate_preferences, collate_sft, encode_preferences, encode_sft
from rlhf_ray.data.readers import DataError


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from rlhf_ray.models.kit import resolve_model_path
    return AutoTokenizer.from_pretrained(resolve_model_path("builtin:tiny"))


def _lim(prompt=32, seq=64, on_long="truncate_left"):
    return Limits(max_prompt_len=prompt, max_seq_len=seq, on_long_prompt=on_long)


def test_sft_layout_and_loss_mask(tok):
    (ex,), counts = encode_sft([{"prompt": "review of the fox :", "response": " the movie was great ."}], tok, _lim())
    p = tok("review of the fox :")["input_ids"]
    r = tok(" the movie was great .", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ex["input_ids"] == p + r
    assert ex["loss_mask"] == [0] * len(p) + [1] * len(r)
    assert not counts


def test_long_prompt_rules(tok):
    row = {"prompt": "review of the fox : " * 10, "response": " good ."}
    full = tok(row["prompt"])["input_ids"]
    (ex,), counts = encode_sft([row], tok, _lim(prompt=8))
    assert ex["input_ids"][:8] == full[-8:] and counts["prompts_truncated"] == 1  # keeps the end
    out, counts = encode_sft([row], tok, _lim(prompt=8, on_long="skip"))
    assert out == [] and counts["prompts_too_long"] == 1
    with pytest.raises(DataError, match="max_prompt_len=8"):
        encode_sft([{**row, "_where": "f.jsonl:7"}], tok, _lim(prompt=8, on_long="error"))


def test_response_truncated_right_and_identical_pairs_counted(tok):
    row = {"prompt": "review of the fox :", "chosen": " great . great . great .", "rejected": " great . great . bad ."}
    p_len = len(tok(row["prompt"])["input_ids"])
    out, counts = encode_preferences([row], tok, _lim(seq=p_len + 2))
    assert out == [] and counts["pairs_identical"] == 1 and counts["responses_truncated"] == 2
    out, _ = encode_preferences([row], tok, _lim())
    assert out[0]["chosen_ids"][-1] == tok.eos_token_id


def test_chat_template_prompt_is_a_prefix(tok):
    tok = tok.__class__.from_pretrained(tok.name_or_path)
    tok.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
                         "{% if add_generation_prompt %}<s>assistant:{% endif %}")
    (ex,), _ = encode_sft([{"prompt": "hi", "response": " yo"}], tok, _lim())
    text = tok.decode(ex["input_ids"])
    assert text.startswith("<s>user: hi</s><s>assistant:")
    masked = tok.decode([t for t, m in zip(ex["input_ids"], ex["loss_mask"]) if m])
    assert "yo" in masked and "user" not in masked


def test_collate_pads_right(tok):
    batch = collate_sft([{"input_ids": [5, 6, 7], "loss_mask": [0, 1, 1]}, {"input_ids": [5], "loss_mask": [1]}], 0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    pairs = collate_preferences([{"chosen_ids": [1, 2, 3], "rejected_ids": [1, 4], "prompt_len": 1}], 0)
    assert pairs["chosen_ids"].shape == pairs["rejected_ids"].shape == torch.Size([1, 3])
    assert pairs["prompt_len"].tolist() == [1]


class _EncoderTokenizer:
    """BERT-style: no EOS, a [SEP] (102) that ends each segment, no chat template."""
    chat_template = None
    eos_token_id = None
    name_or_path = "encoder"

    def __init__(self, sep=102):
        self.sep_token_id = sep

    def __call__(self, text, add_special_tokens=True):
        ids = [len(w) for w in text.split()]
        return {"input_ids": [101, *ids, self.sep_token_id] if add_special_tokens else ids}


def test_an_encoder_tokenizer_ends_the_response_on_its_separator():
    from rlhf_ray.data.encode import prompt_ids, response_ids
    tok = _EncoderTokenizer()
    p = prompt_ids(tok, "a good")
    assert p + response_ids(tok, "a good", p, "film indeed") == [101, 1, 4, 102, 4, 6, 102]
    with pytest.raises(DataError, match="neither an EOS nor a separator"):
        response_ids(_EncoderTokenizer(sep=None), "a", [], "b")


def test_an_unfinished_response_is_read_as_written(tok):
    """A response the generator cut at its token limit: no EOS, no turn close (a reward model must not read it as
    finished); a finished one is closed as in training; an encoder keeps its separator (the pair's layout)."""
    from rlhf_ray.data.encode import prompt_ids, response_ids
    body = tok(" the movie was", add_special_tokens=False)["input_ids"]
    p = prompt_ids(tok, "review of the fox :")
    assert response_ids(tok, "review of the fox :", p, " the movie was") == body + [tok.eos_token_id]
    assert response_ids(tok, "review of the fox :", p, " the movie was", finished=False) == body
    chat = tok.__class__.from_pretrained(tok.name_or_path)
    chat.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
                          "{% if add_generation_prompt %}<s>assistant:{% endif %}")
    p = prompt_ids(chat, "hi")
    closed = response_ids(chat, "hi", p, " the movie was")
    assert closed[-1] == chat.eos_token_id and response_ids(chat, "hi", p, " the movie was", finished=False) == body
    enc = _EncoderTokenizer()
    assert response_ids(enc, "a good", [101, 1, 4, 102], "film indeed", finished=False) == [4, 6, 102]
