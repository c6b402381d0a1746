import json

import pytest

from rlhf_ray.config import load_config
from rlhf_ray.data.prompts import PromptError, load_prompts
from rlhf_ray.models.kit import resolve_model_path


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(resolve_model_path("builtin:tiny"))


def test_builtin_prompts_encode_like_sft(tok):
    from rlhf_ray.data.encode import prompt_ids
    prompts = load_prompts(load_config().data, tok)
    assert len(prompts) == 2000
    assert list(prompts[0].ids) == prompt_ids(tok, prompts[0].text)


def test_jsonl_file_with_chat_rows_and_long_prompt_policies(tmp_path, tok):
    f = tmp_path / "p.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "review of x :"},
        {"prompt": "review of y :"},
        {"prompt": "the movie was great . " * 20},
    ]) + "\n")
    cfg = load_config(None, [f"data.prompts={f}", "data.max_prompt_len=10"])
    out = load_prompts(cfg.data, tok)
    assert [p.text for p in out[:2]] == ["review of x :", "review of y :"] and len(out[2].ids) == 10
    cfg = load_config(None, [f"data.prompts={f}", "data.max_prompt_len=10", "data.on_long_prompt=skip"])
    assert len(load_prompts(cfg.data, tok)) == 2
    cfg = load_config(None, [f"data.prompts={f}", "data.max_prompt_len=10", "data.on_long_prompt=error"])
    with pytest.raises(PromptError, match=r"p.jsonl:3: prompt has \d+ tokens"):
        load_prompts(cfg.data, tok)


def test_chat_rows_need_a_chat_template(tmp_path, tok):
    f = tmp_path / "chat.jsonl"
    f.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(Exception, match="needs a tokenizer with a chat template"):
        load_prompts(load_config(None, [f"data.prompts={f}"]).data, tok)


def test_bad_row_names_file_and_line(tmp_path, tok):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    with pytest.raises(Exception, match="bad.jsonl:2"):
        load_prompts(load_config(None, [f"data.prompts={f}"]).data, tok)
