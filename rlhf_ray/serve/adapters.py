"""LoRA adapters served by name from local folders, on top of Ray Serve LLM's multiplexing.

Ray Serve LLM multiplexes adapters per request (`model="base:adapter"` -> Serve's multiplexed model id ->
the replica loads the adapter into vLLM with a `LoRARequest`, LRU-cached per replica), but it only
*downloads* them from cloud storage (`dynamic_lora_loading_path` must be s3://, gs://, abfss://, azure://).
The choice here: keep its multiplexing and swap the one piece that fetches, a small loader whose lookup
is a {name: local folder} table. A storage endpoint would make every local run depend on an object store
the user may not have; Serve's own multiplexing re-implemented over engine LoRA requests would duplicate
what Ray Serve LLM already does (LRU, per-replica cache, routing to replicas that hold the adapter).
On a multi-node cluster the folders must be on a filesystem every node sees (as for the base model).
The loader is `adapter_loader.LocalLoraLoader`; this module holds what the CLI checks before Ray starts and
imports neither Ray Serve LLM nor vLLM (a bad adapter folder is named in a second, not after vLLM's import).
"""
from __future__ import annotations

import json
from pathlib import Path

ADAPTERS_KEY = "rlhf_ray_adapters"  # where the {name: folder} table rides inside LLMConfig.experimental_configs


def check_adapters(adapters: dict[str, str]) -> dict[str, str]:
    """{name: absolute folder}, each holding a peft adapter; ConfigError naming the entry otherwise."""
    from rlhf_ray.config import ConfigError
    out = {}
    for name, folder in adapters.items():
        path = Path(folder).expanduser().resolve()
        if not (path / "adapter_config.json").is_file():
            raise ConfigError(f"serve.adapters.{name}: {folder} is not a LoRA adapter folder (no adapter_config.json)")
        out[name] = str(path)
    return out


def max_lora_rank(adapters: dict[str, str]) -> int:
    return max(int(json.loads((Path(p) / "adapter_config.json").read_text()).get("r", 8)) for p in adapters.values())
