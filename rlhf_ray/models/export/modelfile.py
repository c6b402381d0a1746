"""The ollama Modelfile beside a GGUF: its file, its chat template (ollama templates are Go templates, so the
tokenizer's Jinja template is translated for the layouts we know, and otherwise left to the template the
GGUF carries in its metadata, which ollama reads), and stop words."""
from __future__ import annotations

from typing import Optional

CHATML = ("{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
          "<|im_start|>assistant\n")
# The Go form of rlhf_ray.models.chat.FALLBACK_TEMPLATE: contents joined by newlines.
PLAIN = "{{- range $i, $m := .Messages }}{{ if $i }}\n{{ end }}{{ $m.Content }}{{ end }}"


def go_template(jinja: Optional[str]) -> tuple[Optional[str], list[str]]:
    """(Go template or None to use the GGUF's own, stop words) for a tokenizer's Jinja chat template."""
    if jinja is None:
        return PLAIN, []
    if "<|im_start|>" in jinja:
        return CHATML, ["<|im_start|>", "<|im_end|>"]
    return None, []


def modelfile(gguf_name: str, jinja: Optional[str], temperature: Optional[float] = None) -> str:
    template, stops = go_template(jinja)
    lines = [f"FROM ./{gguf_name}"]
    if template is not None:
        lines.append(f'TEMPLATE """{template}"""')
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    if temperature is not None:
        lines.append(f"PARAMETER temperature {temperature}")
    return "\n".join(lines) + "\n"
