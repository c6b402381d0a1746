"""The construction arguments of each shipped GPU config pass the libraries' own validation where it runs
without a GPU: vLLM's EngineArgs and config dataclasses, DeepSpeed's config class, transformers'
HfDeepSpeedConfig and BitsAndBytesConfig. Slow only because importing vLLM and DeepSpeed takes seconds."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from rlhf_ray.config import load_config
from rlhf_ray.placement.construct import construct
from rlhf_ray.placement.plan import place

pytestmark = pytest.mark.slow

GPU_CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs" / "gpu").glob("*.yaml"))


@pytest.mark.parametrize("path", GPU_CONFIGS, ids=lambda p: p.name)
def test_engine_arguments_pass_vllms_validation(path, tmp_path):
    from vllm.config import CacheConfig, LoRAConfig, ParallelConfig
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, get_quantization_config
    cfg = load_config(path)
    for e in construct(cfg, place(cfg), cores=16).engines():
        kwargs = e.llm_kwargs(str(tmp_path))  # a local folder: vLLM would look a path up as a hub id
        EngineArgs(**{k: v for k, v in kwargs.items() if k != "use_tqdm_on_load"})  # every name is vLLM's
        CacheConfig(gpu_memory_utilization=e.gpu_memory_utilization)
        parallel = ParallelConfig(tensor_parallel_size=e.tensor_parallel_size,
                                  distributed_executor_backend=e.distributed_executor_backend)
        if e.tensor_parallel_size > 1:  # chosen, so vLLM does not pick its Ray executor inside our bundle
            assert parallel.distributed_executor_backend == "mp"
        if e.enable_lora:
            LoRAConfig(max_lora_rank=e.max_lora_rank, max_loras=1)
        if e.quantization:
            assert e.quantization in QUANTIZATION_METHODS
            assert get_quantization_config(e.quantization).__name__ == "OnlineQuantizationConfig"


@pytest.mark.parametrize("path", GPU_CONFIGS, ids=lambda p: p.name)
def test_learner_arguments_pass_deepspeeds_and_transformers_validation(path):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch
    from deepspeed.runtime.config import DeepSpeedConfig
    from transformers import BitsAndBytesConfig
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config
    cfg = load_config(path)
    for p in construct(cfg, place(cfg), cores=16).processes:
        for a in p.learners:
            ds = a.deepspeed_config
            # without a process group DeepSpeed counts one rank: check the batch sizes for that one
            one = DeepSpeedConfig({**ds, "train_batch_size": ds["train_micro_batch_size_per_gpu"]})
            assert one.zero_optimization_stage == a.zero_stage
            assert one.bfloat16_config.enabled == (a.dtype == "bfloat16")
            assert one.zero_config.offload_optimizer is not None or not a.offload_optimizer
            hf = HfDeepSpeedConfig(ds)
            try:
                assert hf.is_zero3() == a.zero_init
            finally:
                unset_hf_deepspeed_config()
            if a.bnb_4bit:
                bnb = BitsAndBytesConfig(load_in_4bit=True, **{**a.bnb_4bit, "bnb_4bit_compute_dtype": getattr(
                    torch, a.bnb_4bit["bnb_4bit_compute_dtype"])})
                assert bnb.bnb_4bit_quant_type == "nf4"
