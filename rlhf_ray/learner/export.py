"""Write HF folders from named tensors (rank 0 only; the caller gathered them)."""
from __future__ import annotations

import copy
from pathlib import Path

import torch


def write_full(out: Path, state: dict[str, torch.Tensor], config, architecture: str) -> None:
    from safetensors.torch import save_file
    cfg = copy.deepcopy(config)
    cfg.__dict__.pop("quantization_config", None)  # the export is full precision, whatever the base was
    cfg.architectures = [architecture]
    dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
    cfg.dtype = str(next(iter(dtypes))).removeprefix("torch.") if len(dtypes) == 1 else "float32"
    cfg.use_cache = True
    cfg.save_pretrained(out)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})


def write_adapter(out: Path, state: dict[str, torch.Tensor], peft_config, base_path: str) -> None:
    from safetensors.torch import save_file
    cfg = copy.deepcopy(peft_config)
    cfg.base_model_name_or_path = base_path
    cfg.inference_mode = True
    cfg.save_pretrained(str(out))
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "adapter_model.safetensors"),
              metadata={"format": "pt"})
