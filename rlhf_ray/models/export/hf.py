"""Merged HF export, streamed: one base tensor at a time, the LoRA delta added on the way, written into
size-capped safetensors shards. Peak memory is one shard, never the whole model."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Iterator, Optional

import torch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json", "vocab.json", "merges.txt", "tokenizer.model")


def base_tensors(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder} holds no *.safetensors weights")
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                yield name, st.get_tensor(name)


def lora_deltas(adapter: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """{base weight name: (A, B, scale)}; W' = W + scale * B @ A (LoRA, Hu et al. 2021, eq. 3)."""
    from safetensors.torch import load_file
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    r, alpha = cfg["r"], cfg["lora_alpha"]
    scale = alpha / r ** 0.5 if cfg.get("use_rslora") else alpha / r
    state = load_file(str(adapter / "adapter_model.safetensors"))  # megabytes: the adapter alone
    out = {}
    for key, a in state.items():
        if ".lora_A." not in key:
            continue
        module = key.split(".lora_A.")[0].removeprefix("base_model.model.")
        out[module + ".weight"] = (a, state[key.replace(".lora_A.", ".lora_B.")], scale)
    return out


def merged_tensors(base: Path, adapter: Optional[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    deltas = lora_deltas(adapter) if adapter else {}
    used = set()
    for name, w in base_tensors(base):
        if name in deltas:
            a, b, scale = deltas[name]
            w = (w.float() + scale * (b.float() @ a.float())).to(w.dtype)
            used.add(name)
        yield name, w
    if missing := set(deltas) - used:
        raise ValueError(f"the adapter changes weights the base does not have: {sorted(missing)[:3]}")


def write_sharded(tensors: Iterator[tuple[str, torch.Tensor]], out: Path, shard_bytes: int = 2 << 30) -> int:
    """Shards named like transformers' own (model-00001-of-00003.safetensors + index); returns the shard count."""
    from safetensors.torch import save_file
    shards: list[dict[str, torch.Tensor]] = [{}]
    size, total, written = 0, 0, []

    def flush():
        path = out / f"part-{len(written):05d}.safetensors"
        save_file(shards[0], str(path), metadata={"format": "pt"})
        written.append((path, list(shards[0])))
        shards[0] = {}

    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if shards[0] and size + nbytes > shard_bytes:
            flush()
            size = 0
        shards[0][name] = t.contiguous()
        size, total = size + nbytes, total + nbytes
    flush()
    n = len(written)
    if n == 1:
        written[0][0].rename(out / "model.safetensors")
        return 1
    weight_map = {}
    for i, (path, keys) in enumerate(written):
        final = out / f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        path.rename(final)
        weight_map.update({k: final.name for k in keys})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}, indent=1))
    return n


def export_hf(base: Path, adapter: Optional[Path], out: Path, shard_bytes: int = 2 << 30) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((base / "config.json").read_text())
    config.pop("quantization_config", None)  # the export is full precision
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for f in TOKENIZER_FILES:
        if (base / f).exists():
            shutil.copy(base / f, out / f)
    write_sharded(merged_tensors(base, adapter), out, shard_bytes)
    return out


def export_adapter(adapter: Optional[Path], out: Path) -> Path:
    from rlhf_ray.errors import RunError
    if adapter is None:
        raise RunError("export --format adapter: this run has no LoRA adapter (it trained all weights); "
                       "use --format hf")
    shutil.copytree(adapter, out, dirs_exist_ok=True)
    return out
