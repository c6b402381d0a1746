"""A hub cache in huggingface_hub's own layout, holding only config.json files (published shapes).

    $HF_HUB_CACHE/models--org--name/refs/main            -> <sha>
    $HF_HUB_CACHE/models--org--name/snapshots/<sha>/config.json
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

LLAMA31 = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=128256, head_dim=128,
               tie_word_embeddings=False, torch_dtype="bfloat16", rms_norm_eps=1e-5)
# The config.json fields that count parameters, as published with each model.
PUBLISHED = {
    "meta-llama/Llama-3.1-8B-Instruct": dict(LLAMA31, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                             num_attention_heads=32, num_key_value_heads=8),
    "meta-llama/Llama-3.1-70B-Instruct": dict(LLAMA31, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                              num_attention_heads=64, num_key_value_heads=8),
    "Skywork/Skywork-Reward-Llama-3.1-8B-v0.2": dict(LLAMA31, architectures=["LlamaForSequenceClassification"],
                                                     num_labels=1, hidden_size=4096, intermediate_size=14336,
                                                     num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8),
    "meta-llama/Llama-2-7b-hf": dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                                     num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32),
}


def make_hub_cache(root: Path, configs: dict[str, dict] = PUBLISHED) -> Path:
    for repo, cfg in configs.items():
        folder = root / ("models--" + repo.replace("/", "--"))
        sha = hashlib.sha1(repo.encode()).hexdigest()
        snap = folder / "snapshots" / sha
        snap.mkdir(parents=True, exist_ok=True)
        (snap / "config.json").write_text(json.dumps(cfg))
        (folder / "refs").mkdir(exist_ok=True)
        (folder / "refs" / "main").write_text(sha)
    return root


if __name__ == "__main__":  # python tests/placement/hubcache.py DIR: a cache for `rlhf-ray plan` by hand
    import sys
    print(make_hub_cache(Path(sys.argv[1])))
