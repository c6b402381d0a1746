"""Parameter counts and byte sizes against published figures (tolerances stated per test)."""
import json

import pytest

from rlhf_ray.placement.memory import DTYPE_BYTES, nf4_bits
from rlhf_ray.placement.shapes import ModelShape, ShapeError
from tests.placement.hubcache import PUBLISHED


def shape(repo: str, tmp_path) -> ModelShape:
    """Through a config.json file written here, as the plan reads it (no weights)."""
    folder = tmp_path / repo.replace("/", "--")
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(PUBLISHED[repo]))
    return ModelShape.from_config(json.loads((folder / "config.json").read_text()), name=str(folder))


def test_llama31_8b_is_8_03b_parameters_and_16_1_gb_in_bf16(tmp_path):
    s = shape("meta-llama/Llama-3.1-8B-Instruct", tmp_path)
    assert s.params() == pytest.approx(8.03e9, rel=0.005)            # model card: 8.03B
    assert s.params() * DTYPE_BYTES["bfloat16"] == pytest.approx(16.1e9, rel=0.005)  # 16.1 GB (decimal)
    assert s.params() == 8_030_261_248                                 # exact sum of the safetensors shapes


def test_llama31_70b_is_70_6b_parameters(tmp_path):
    assert shape("meta-llama/Llama-3.1-70B-Instruct", tmp_path).params() == pytest.approx(70.6e9, rel=0.005)


def test_llama2_7b_and_its_classic_lora_count(tmp_path):
    s = shape("meta-llama/Llama-2-7b-hf", tmp_path)
    assert s.params() == pytest.approx(6.74e9, rel=0.005)               # paper: 6.7B; card 6.74B
    assert s.lora_params(8, ("q_proj", "v_proj")) == 4_194_304         # peft's print_trainable_parameters


def test_value_and_score_heads_replace_the_lm_head(tmp_path):
    s = shape("meta-llama/Llama-3.1-8B-Instruct", tmp_path)
    assert s.params() - s.params("value") == 128256 * 4096 - 4096


def test_nf4_costs_4_127_bits_with_double_quant():
    # QLoRA paper, section 3: constants fall from 32/64 = 0.5 to 8/64 + 32/(64*256) = 0.127 bits per parameter
    assert nf4_bits(True) == pytest.approx(4.127, abs=5e-4)
    assert nf4_bits(False) == 4.5


def test_kv_cache_per_token(tmp_path):
    s = shape("meta-llama/Llama-3.1-8B-Instruct", tmp_path)
    assert s.kv_bytes_per_token(2.0) == 2 * 32 * 8 * 128 * 2           # 128 KiB: K and V, 8 KV heads of 128
    assert s.kv_bytes_per_token(2.0, tp=8) == 2 * 32 * 1 * 128 * 2     # one KV head per GPU at TP=8
    assert s.kv_bytes_per_token(2.0, tp=16) == 2 * 32 * 1 * 128 * 2    # replicated, not split further


def test_missing_field_and_unknown_lora_target_are_named(tmp_path):
    bad = dict(PUBLISHED["meta-llama/Llama-3.1-8B-Instruct"])
    del bad["intermediate_size"]
    with pytest.raises(ShapeError, match="'intermediate_size'"):
        ModelShape.from_config(bad)
    s = shape("meta-llama/Llama-3.1-8B-Instruct", tmp_path)
    with pytest.raises(ShapeError, match=r"\['c_attn'\]"):
        s.lora_params(8, ("q_proj", "c_attn"))
