"""Build the trainable model of one rank: HF model of the right kind, optional 4-bit base, optional LoRA.

Kinds, all saved and loaded back as plain HF folders:
  policy  AutoModelForCausalLM                       -> logits (B, L, V)
  reward  AutoModelForSequenceClassification(1)      -> a score per sequence (B,)
  value   AutoModelForTokenClassification(1)         -> a value per token (B, L): the causal-LM backbone
          with a scalar head, PPO's critic (a fresh head when started from a policy checkpoint)
QLoRA is "LoRA with a quantized base": the same LoRA step runs after a 4-bit load (Dettmers et al. 2023).
"""
from __future__ import annotations

import contextlib
from typing import Literal, Optional

import torch

from rlhf_ray.config.schema import ModelConfig
from rlhf_ray.utils.device import Backend, attention_kwargs

Kind = Literal["policy", "reward", "value"]

_PEFT_TASK = {"policy": "CAUSAL_LM", "reward": "SEQ_CLS", "value": "TOKEN_CLS"}


def model_class(kind: Kind):
    import transformers
    classes = {"policy": transformers.AutoModelForCausalLM,
               "reward": transformers.AutoModelForSequenceClassification,
               "value": transformers.AutoModelForTokenClassification}
    if kind not in classes:
        raise ValueError(f"learner kind must be one of {sorted(classes)}, got {kind!r}")
    return classes[kind]


def quantization_config(cfg: ModelConfig, backend: Backend, kind: Kind = "policy"):
    from transformers import BitsAndBytesConfig
    q = cfg.quantization
    compute = backend.dtype if q.compute_dtype == "auto" else getattr(torch, q.compute_dtype)
    # transformers keeps the output head unquantized by finding the model's last *weight*; the value model's
    # head ends in a bias, so its 1-row `score` would be quantized, and a 4-bit layer with one output fails
    # in bitsandbytes (PPO + QLoRA stopped at the critic's first step). Name it.
    skip = ["score", "classifier"] if kind == "value" else None
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=q.quant_type,
                              bnb_4bit_use_double_quant=q.double_quant, bnb_4bit_compute_dtype=compute,
                              bnb_4bit_quant_storage=torch.uint8, llm_int8_skip_modules=skip)


def load_tokenizer(cfg: ModelConfig, path: str):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(cfg.tokenizer or path)
    if tok.pad_token_id is None:  # batches are right-padded; the pad id is never attended to
        tok.pad_token = tok.eos_token
    return tok


@contextlib.contextmanager
def zero3_init(deepspeed_config: Optional[dict]):
    """Build a ZeRO-3 model partitioned as it loads: transformers wraps `from_pretrained` in
    `deepspeed.zero.Init` only while an `HfDeepSpeedConfig` is alive (`integrations/deepspeed.py`,
    `is_deepspeed_zero3_enabled`); without it every rank loads the whole model into host RAM (eight 70B ranks:
    1.1 TB a node) and DeepSpeed then moves a module it did not partition to the GPU. The config is dropped
    on exit, so a model built later in the same process (a colocated reference) is not partitioned too.
    Any other stage (or None): nothing changes."""
    if not deepspeed_config or deepspeed_config.get("zero_optimization", {}).get("stage") != 3:
        yield
        return
    import torch._dynamo  # noqa: F401 - before zero.Init, or transformers' lazy imports fail (STACK.md)
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config
    live = HfDeepSpeedConfig(deepspeed_config)  # transformers holds only a weak reference: keep it alive here
    try:
        yield
    finally:
        unset_hf_deepspeed_config()
        del live


def build_model(cfg: ModelConfig, kind: Kind, path: str, backend: Backend, pad_token_id: int,
                deepspeed_config: Optional[dict] = None) -> torch.nn.Module:
    """The HF model (wrapped by peft when LoRA is on), on `backend.device`, trainable parameters marked.
    `deepspeed_config`: what `deepspeed.initialize` will get; under ZeRO-3 the model is built partitioned
    (`zero3_init`)."""
    kwargs: dict = {"dtype": backend.dtype, **attention_kwargs(backend.device, backend.dtype)}
    if kind != "policy":
        kwargs["num_labels"] = 1
    if cfg.quantization.load_in_4bit:
        kwargs["quantization_config"] = quantization_config(cfg, backend, kind)
        kwargs["device_map"] = {"": backend.device}
    cls = model_class(kind)
    with zero3_init(deepspeed_config):
        model = cls.from_pretrained(path, **kwargs)
    model.config.pad_token_id = pad_token_id
    model.config.use_cache = False
    if kind == "value":
        # transformers puts a 0.1 dropout before the token head: the critic's values (no-grad, eval) would
        # come from another function than the one its loss trains, and each update from random masks.
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
    if cfg.quantization.load_in_4bit:
        _same_4bit_kernel_for_inference(model)
        from peft import prepare_model_for_kbit_training
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    elif cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if cfg.lora.enabled:
        from peft import LoraConfig, get_peft_model
        lcfg = LoraConfig(task_type=_PEFT_TASK[kind], r=cfg.lora.r, lora_alpha=cfg.lora.alpha,
                          lora_dropout=cfg.lora.dropout, target_modules=list(cfg.lora.target_modules))
        if cfg.gradient_checkpointing:
            model.enable_input_require_grads()  # frozen embeddings would cut the checkpointed graph
        model = get_peft_model(model, lcfg)
    return model


def _same_4bit_kernel_for_inference(model: torch.nn.Module) -> None:
    """Keep bitsandbytes' no-grad CPU forward on the training kernel.

    On AVX512-BF16 CPUs, `Linear4bit` repacks its weight for a faster inference kernel on the first
    no-grad forward. That kernel needs out_features % 32 == 0 (it asserts on the tiny model's 344), and
    it would make reference / old log-probs come from a different kernel than the training forward, so
    PPO ratios would not start at exactly 1. One kernel for both.
    """
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False


def peft_loaded():
    """The peft module when this process imported it, else None: a model can hold peft layers only once peft
    was imported, and importing it (with bitsandbytes) costs about 1.4 s of every learner process's start."""
    import sys
    return sys.modules.get("peft")


def unwrap_peft(model: torch.nn.Module) -> torch.nn.Module:
    """The HF model inside a peft wrapper (LoRA layers injected in place), or the model itself."""
    peft = peft_loaded()
    return model.base_model.model if peft is not None and isinstance(model, peft.PeftModel) else model
