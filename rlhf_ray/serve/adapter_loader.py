"""The loader Ray Serve LLM's multiplexing calls for an adapter (`adapters.py` says why it is ours): a lookup in
the {name: local folder} table the deployment's config carries, instead of a download."""
from __future__ import annotations

from ray.llm._internal.common.models import global_id_manager
from ray.llm._internal.common.utils.lora_utils import get_lora_id
from ray.llm._internal.serve.core.configs.llm_config import DiskMultiplexConfig
from ray.llm._internal.serve.core.configs.openai_api_models import OpenAIHTTPException
from ray.llm._internal.serve.utils.lora_serve_utils import LoraModelLoader

from rlhf_ray.serve.adapters import ADAPTERS_KEY


class LocalLoraLoader(LoraModelLoader):
    """`LoraModelLoader` that looks adapters up in the table instead of downloading them."""

    async def load_model_from_config(self, lora_model_id: str, llm_config) -> DiskMultiplexConfig:
        if lora_model_id in self.disk_cache:
            return self.disk_cache[lora_model_id]
        table = llm_config.experimental_configs.get(ADAPTERS_KEY, {})
        name = get_lora_id(lora_model_id)
        if name not in table:
            raise OpenAIHTTPException(404, f"model {lora_model_id!r}: no adapter named {name!r}; served adapters: "
                                           f"{sorted(table)}", type="NotFoundError")
        config = DiskMultiplexConfig(model_id=lora_model_id, max_total_tokens=None, local_path=table[name],
                                     lora_assigned_int_id=global_id_manager.next())
        self.disk_cache[lora_model_id] = config
        return config
