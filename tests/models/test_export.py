"""`rlhf-ray export`: the GGUF read back (gguf's reader and transformers) gives the HF model's logits; the merged
HF export equals peft's merge; the Modelfile names the file and the template."""
import json

import numpy as np
import pytest
import torch

from rlhf_ray.models.export import export
from rlhf_ray.models.export.gguf_file import permute_qk
from rlhf_ray.models.kit import resolve_model_path

IDS = torch.tensor([[1, 5, 77, 300, 12, 9, 41, 200, 3, 8]])
# Measured on builtin:tiny (logits within +-0.92, std 0.23): f32 0.0, f16 4.9e-4, q8_0 1.07e-2 (one scale per
# 32 weights). Leaving Q/K unpermuted gives 2.6e-2 at f32, so the f32 bound is what guards the permutation.
TOL = {"f32": 1e-4, "f16": 2e-3, "q8_0": 2e-2}
# SmolLM2-135M: f32 0.0; q8_0 1.04 with logits within +-33 (over 10 positions x 49,152 tokens).
SMOL_Q8_TOL = 1.5


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits.float()


@pytest.fixture(scope="module")
def tiny():
    from transformers import AutoModelForCausalLM
    path = resolve_model_path("builtin:tiny")
    return path, AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


@pytest.mark.parametrize("kind, tol", TOL.items())
def test_gguf_loads_back_in_transformers_with_the_same_logits(tiny, tmp_path, kind, tol):
    from transformers import AutoModelForCausalLM
    path, hf = tiny
    lines = export("builtin:tiny", "gguf", str(tmp_path), gguf_type=kind)
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=f"tiny-{kind}.gguf", dtype=torch.float32)
    diff = (_logits(back) - _logits(hf)).abs().max().item()
    print(f"{kind}: max |logit diff| = {diff:.2e}")
    assert diff <= tol
    assert any(line.startswith(f"cd {tmp_path} && ollama create tiny -f Modelfile") for line in lines)
    assert any(line.startswith("vllm serve ") for line in lines)


def test_gguf_reader_sees_permuted_hf_weights(tiny, tmp_path):
    import gguf
    _, hf = tiny
    export("builtin:tiny", "gguf", str(tmp_path), gguf_type="f32")
    reader = gguf.GGUFReader(tmp_path / "tiny-f32.gguf")
    tensors = {t.name: np.asarray(t.data).reshape([int(d) for d in reversed(t.shape)]) for t in reader.tensors}
    sd = hf.state_dict()
    n_head = hf.config.num_attention_heads
    assert np.array_equal(tensors["blk.1.attn_q.weight"], permute_qk(sd["model.layers.1.self_attn.q_proj.weight"],
                                                                     n_head).numpy())
    assert not np.array_equal(tensors["blk.1.attn_q.weight"], sd["model.layers.1.self_attn.q_proj.weight"].numpy())
    assert np.array_equal(tensors["token_embd.weight"], sd["model.embed_tokens.weight"].numpy())
    assert np.array_equal(tensors["output.weight"], sd["lm_head.weight"].numpy())
    field = reader.fields["llama.attention.head_count"]
    assert int(field.parts[field.data[0]][0]) == n_head


def test_modelfile_names_the_file_and_template(tmp_path):
    export("builtin:tiny", "gguf", str(tmp_path), gguf_type="q8_0")
    text = (tmp_path / "Modelfile").read_text()
    assert text.startswith("FROM ./tiny-q8_0.gguf\n") and 'TEMPLATE """' in text and "$m.Content" in text


def test_permute_qk_interleaves_rotary_halves():
    w = torch.arange(8.0).reshape(8, 1)  # one head, head_dim 8: halves [0 1 2 3] [4 5 6 7]
    assert permute_qk(w, 1).flatten().tolist() == [0, 4, 1, 5, 2, 6, 3, 7]


@pytest.fixture(scope="module")
def adapter(tiny, tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    path, _ = tiny
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                      init_lora_weights=False))
    out = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(out)
    return out, _logits(model.merge_and_unload())


def test_hf_export_merges_the_adapter_in_shards(adapter, tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    from rlhf_ray.models.export.hf import export_hf
    folder, want = adapter
    path, hf = tiny
    export_hf(__import__("pathlib").Path(path), folder, tmp_path, shard_bytes=300_000)  # several shards
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    back = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert (_logits(back) - want).abs().max().item() <= 1e-5
    assert (_logits(back) - _logits(hf)).abs().max().item() > 1e-3  # the adapter did change the model


def test_adapter_export_and_an_adapter_folder_as_source(adapter, tmp_path):
    folder, _ = adapter
    lines = export(str(folder), "adapter", str(tmp_path / "a"))
    assert (tmp_path / "a" / "adapter_model.safetensors").exists() and "--lora-modules" in lines[-1]
    export(str(folder), "gguf", str(tmp_path / "g"), gguf_type="f32")  # merged on the way into the GGUF
    assert (tmp_path / "g" / f"{folder.name}-f32.gguf").exists()


def test_bad_source_is_one_line(tmp_path):
    from rlhf_ray.errors import RunError
    with pytest.raises(RunError, match="neither a run folder"):
        export(str(tmp_path), "hf", str(tmp_path / "o"))
    with pytest.raises(RunError, match="has no LoRA adapter"):
        export("builtin:tiny", "adapter", str(tmp_path / "o"))


# builds SmolLM2-135M from its package on first use (about 40 s) and loads it 3 times. The long tier's: the
# tiny model's GGUF matches transformers' logits in `make test` (above), through the same writer
@pytest.mark.slow
@pytest.mark.long
def test_smollm2_gguf_logits_and_chatml_modelfile(tmp_path):
    from transformers import AutoModelForCausalLM
    path = resolve_model_path("builtin:smollm2-135m")
    want = _logits(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32))
    for kind, tol in (("f32", 1e-4), ("q8_0", SMOL_Q8_TOL)):
        export("builtin:smollm2-135m", "gguf", str(tmp_path), gguf_type=kind)
        back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=f"smollm2-135m-{kind}.gguf",
                                                    dtype=torch.float32)
        diff = (_logits(back) - want).abs().max().item()
        print(f"smollm2 {kind}: max |logit diff| = {diff:.2e} (logits within +-{want.abs().max().item():.1f})")
        assert diff <= tol
    text = (tmp_path / "Modelfile").read_text()
    assert "<|im_start|>{{ .Role }}" in text and 'PARAMETER stop "<|im_end|>"' in text


def test_export_cli_prints_the_commands(tmp_path, capsys):
    from rlhf_ray.cli import main
    assert main(["export", "builtin:tiny", "--format", "hf", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"vllm serve {tmp_path} --served-model-name tiny" in out and (tmp_path / "model.safetensors").exists()
