"""A scaled-down ZeRO-3 learner on 2 GPUs is built under `deepspeed.zero.Init`: each rank holds 1/N of the
parameters on its GPU, and no rank materialises the whole model on the host while building it (issue 21,
finding 3: without a live `HfDeepSpeedConfig` every rank loaded the full model). Each rank is a process of
its own (torch.multiprocessing), joined by NCCL."""
import json
import threading
import time

import torch
import torch.multiprocessing as mp

from rlhf_ray.utils.net import free_port

from .helpers import join_world, tier

pytestmark = tier(2, "deepspeed")
WORLD = 2


def _write_model(folder):
    """A random Llama of about 110M parameters (big enough that a full copy shows over the noise)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlhf_ray.models.kit import resolve_model_path
    from transformers import AutoTokenizer
    cfg = LlamaConfig(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                      num_key_value_heads=12, vocab_size=32000, max_position_embeddings=256, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(resolve_model_path("builtin:tiny")).save_pretrained(folder)  # ids < 512 only
    return sum(p.numel() for p in model.parameters())


class AnonPeak:
    """The peak growth of this process's anonymous resident memory (RssAnon: the heap, not the mmap'd weight
    files), sampled every 5 ms while the block runs. A full model built on the host shows as its size."""

    def __enter__(self):
        self.base = self.peak = self._now()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @staticmethod
    def _now() -> int:
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
        return 0

    def _watch(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._now())
            time.sleep(0.005)

    @property
    def growth(self) -> int:
        return self.peak - self.base


def _rank(rank, port, folder, params, out):
    join_world(rank, WORLD, port)
    from rlhf_ray.config.schema import LearnerConfig, ModelConfig
    from rlhf_ray.learner.learner import Learner
    from rlhf_ray.utils.device import resolve_backend
    import deepspeed  # noqa: F401  (imported before measuring: its import is not the model)
    import transformers  # noqa: F401
    with AnonPeak() as host:
        learner = Learner(ModelConfig(path=str(folder), dtype="bfloat16"),
                          LearnerConfig(micro_batch_size=1, optim={"lr": 1e-4}, deepspeed={"zero_stage": 3}),
                          kind="policy", init_path=str(folder), backend=resolve_backend("cuda", "bfloat16"),
                          total_updates=2, seed=0)
    mine = sum(p.ds_tensor.numel() for p in learner.model.parameters() if hasattr(p, "ds_tensor"))
    every = all(hasattr(p, "ds_id") for p in learner.model.parameters())
    (out / f"rank{rank}.json").write_text(json.dumps({
        "partition_numel": mine, "all_partitioned": every, "host_growth": host.growth,
        "allocated": torch.cuda.memory_allocated(), "peak": torch.cuda.max_memory_allocated()}))


def test_zero3_learner_holds_one_nth_per_rank(tmp_path):
    params = _write_model(tmp_path / "model")
    mp.spawn(_rank, args=(free_port(), tmp_path / "model", params, tmp_path), nprocs=WORLD, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    full_bf16 = 2 * params
    for r in ranks:
        assert r["all_partitioned"]
        assert abs(r["partition_numel"] - params / WORLD) <= 0.01 * params   # 1/N of the weights (padding aside)
        # bf16 weights + fp32 master, Adam m, v: 14 bytes a parameter, split N ways; +25% for buffers
        assert r["allocated"] <= 1.25 * 14 * params / WORLD + 256 * 2 ** 20, r
        # built under zero.Init: no rank held the whole bf16 model in its heap (the full-load path does, per rank)
        assert r["host_growth"] < 0.5 * full_bf16, r
