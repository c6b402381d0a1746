"""GGUF for llama.cpp and ollama, written with the `gguf` package (Llama-architecture models).

llama.cpp's converter script is not part of the package, so two of its steps live here:
- the Q/K row permutation: HF stores rotary pairs as two halves of each head (rotate_half), llama.cpp
  as interleaved pairs; `permute_qk` reorders rows per head (transformers' GGUF loader undoes it).
- the type per tensor: q8_0 and f16 apply to 2-D weights whose rows split into 32-wide blocks; norms (1-D)
  and rows that do not split stay f32, as llama.cpp's converter does.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7}  # llama.cpp's LLAMA_FTYPE values


def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """(n_head * head_dim, in) rows from HF's [first halves | second halves] order to interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hparams(writer, config: dict) -> None:
    n_head = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // n_head
    rope = (config.get("rope_parameters") or {}).get("rope_theta", config.get("rope_theta", 10000.0))
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(config.get("num_key_value_heads", n_head))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(float(rope))
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(config["vocab_size"])


def _vocab(writer, folder: Path, vocab_size: int) -> None:
    """A byte-level BPE tokenizer (tokenizer.json), as llama.cpp's "gpt2" tokenizer model."""
    import gguf
    tok = json.loads((folder / "tokenizer.json").read_text())
    if tok["model"]["type"] != "BPE":
        raise ValueError(f"GGUF export supports BPE tokenizers; {folder} has {tok['model']['type']}")
    by_id = {i: t for t, i in tok["model"]["vocab"].items()}
    special = {a["id"]: a["content"] for a in tok.get("added_tokens", [])}
    by_id.update(special)
    tokens, types = [], []
    for i in range(vocab_size):
        tokens.append(by_id.get(i, f"[PAD{i}]"))
        types.append(gguf.TokenType.CONTROL if i in special else
                     gguf.TokenType.NORMAL if i in by_id else gguf.TokenType.UNUSED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    # BOS/EOS/pad ids, merges and the chat template (ollama reads it when the Modelfile has none).
    gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size).add_to_gguf(writer, quiet=True)


def _encode(name: str, t: torch.Tensor, out_type: str):
    import gguf
    data = t.float().numpy()
    blocks_fit = data.ndim == 2 and data.shape[-1] % 32 == 0
    if out_type == "q8_0" and blocks_fit:
        return gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    if out_type in ("f16", "q8_0") and data.ndim == 2:
        return data.astype(np.float16), gguf.GGMLQuantizationType.F16
    return data.astype(np.float32), gguf.GGMLQuantizationType.F32


def write_gguf(tensors: Iterator[tuple[str, torch.Tensor]], folder: Path, out: Path, out_type: str) -> Path:
    import gguf
    config = json.loads((folder / "config.json").read_text())
    if config.get("model_type") != "llama":
        raise ValueError(f"GGUF export supports Llama-architecture models; {folder} is {config.get('model_type')!r}")
    n_head = config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads", n_head)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    # use_temp_file: tensors spool to disk as they come, so memory holds one tensor, not the model.
    writer = gguf.GGUFWriter(str(out), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA], use_temp_file=True)
    writer.add_name(folder.resolve().name)
    _hparams(writer, config)
    writer.add_file_type(FILE_TYPES[out_type])
    _vocab(writer, folder, config["vocab_size"])
    for name, t in tensors:
        if name.endswith("rotary_emb.inv_freq"):
            continue
        if name.endswith("q_proj.weight"):
            t = permute_qk(t, n_head)
        elif name.endswith("k_proj.weight"):
            t = permute_qk(t, n_kv)
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise ValueError(f"no GGUF name for tensor {name!r}")
        data, qtype = _encode(name, t, out_type)
        writer.add_tensor(target, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
