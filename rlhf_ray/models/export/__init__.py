"""`rlhf-ray export`: a trained policy as the files other tools run.

  hf       merged HF folder (sharded safetensors, written tensor by tensor)  -> vLLM, transformers
  adapter  the LoRA adapter alone (peft layout)                               -> vLLM --lora-modules, peft
  gguf     one GGUF file (f32, f16 or q8_0) and an ollama Modelfile         -> ollama, llama.cpp
"""
from rlhf_ray.models.export.run import EXPORTERS, export

__all__ = ["EXPORTERS", "export"]
