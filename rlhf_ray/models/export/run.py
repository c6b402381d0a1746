"""One exporter per format; each writes under `out` and returns the lines to print (paths and commands)."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

from rlhf_ray.models.export.source import Source, resolve_source


def _hf(src: Source, out: Path, **_) -> list[str]:
    from rlhf_ray.models.export.hf import export_hf
    folder = export_hf(src.base, src.to_merge, out)
    return [f"merged HF model: {folder}", f"vllm serve {folder} --served-model-name {src.name}"]


def _adapter(src: Source, out: Path, **_) -> list[str]:
    from rlhf_ray.models.export.hf import export_adapter
    folder = export_adapter(src.adapter, out)
    return [f"LoRA adapter: {folder} (base: {src.base})",
            f"vllm serve {src.base} --enable-lora --lora-modules {src.name}={folder}"]


def _gguf(src: Source, out: Path, gguf_type: str = "f16", **_) -> list[str]:
    from rlhf_ray.models.export.gguf_file import write_gguf
    from rlhf_ray.models.export.hf import merged_tensors
    from rlhf_ray.models.export.modelfile import modelfile
    from rlhf_ray.models.chat import model_chat_template
    out.mkdir(parents=True, exist_ok=True)
    name = f"{src.name}-{gguf_type}.gguf"
    path = write_gguf(merged_tensors(src.base, src.to_merge), src.base, out / name, gguf_type)
    (out / "Modelfile").write_text(modelfile(name, model_chat_template(str(src.base))))
    tag = re.sub(r"[^a-z0-9._-]", "-", src.name.lower())
    vllm_hf = src.base if src.to_merge is None else "<the folder of: rlhf-ray export ... --format hf>"
    return [f"GGUF ({gguf_type}): {path}", f"Modelfile: {out / 'Modelfile'}",
            f"cd {out} && ollama create {tag} -f Modelfile && ollama run {tag}",
            f"vllm serve {vllm_hf} --served-model-name {tag}   # vLLM 0.32 serves HF folders, not GGUF"]


EXPORTERS: dict[str, Callable[..., list[str]]] = {"hf": _hf, "adapter": _adapter, "gguf": _gguf}


def export(spec: str, fmt: str, out: str, gguf_type: str = "f16") -> list[str]:
    src = resolve_source(spec)
    return EXPORTERS[fmt](src, Path(out), gguf_type=gguf_type)
