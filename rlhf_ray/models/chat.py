"""Chat templates: the model's own when it has one, else a plain one, so chat works on any policy.

The fallback joins the messages' contents with newlines, the layout the built-in tasks train on; it is
also what `rlhf-ray export --format gguf` writes into an ollama Modelfile (as a Go template) for models
without a template, so a policy answers the same chat the same way under Ray Serve and under ollama.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

FALLBACK_TEMPLATE = ("{% for m in messages %}{% if not loop.first %}\n{% endif %}{{ m['content'] }}{% endfor %}")


def model_chat_template(model_path: str) -> Optional[str]:
    """The tokenizer's own chat template (transformers keeps it in chat_template.jinja or the tokenizer config)."""
    folder = Path(model_path)
    if (folder / "chat_template.jinja").exists():
        return (folder / "chat_template.jinja").read_text()
    config = folder / "tokenizer_config.json"
    if config.exists():
        template = json.loads(config.read_text()).get("chat_template")
        if isinstance(template, str) and template:
            return template
    return None


def serving_chat_template(model_path: str, override: Optional[str]) -> Optional[str]:
    """The template to hand vLLM: `override` (a file or the text itself), None to use the model's own, or the
    fallback for a model that has none (vLLM refuses chat requests without a template)."""
    if override:
        return Path(override).read_text() if Path(override).is_file() else override
    return None if model_chat_template(model_path) else FALLBACK_TEMPLATE
