"""A full-weight export streams to host memory: the device side holds one tensor at a time, never the model.

On CPU "device" and "host" are one memory, so the learner's tensors are tracked instead
(`tests.sync.live_bytes.LiveBytes`): every tensor the learner hands out is backed by an array whose
lifetime is observed. Today's GPU failure (`dict(named_weights)` of device clones: 15 GiB beside the
learner on a 4090, 141 GB on one 80 GB H100) shows up here as every tracked byte alive at once.
No DeepSpeed: `Learner.export_hf` runs on a stand-in rank 0 with a real HF config.
"""
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from rlhf_ray.learner import export
from rlhf_ray.learner.learner import Learner
from tests.sync.live_bytes import LiveBytes


@pytest.fixture(scope="module")
def tiny():
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from rlhf_ray.models.kit import resolve_model_path
    path = resolve_model_path("builtin:tiny")
    from pathlib import Path
    state = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        state.update(load_file(str(f)))
    return AutoConfig.from_pretrained(path), state


def _standin(live, config, state, *, rank=0, zero_stage=0):
    saved = []
    return SimpleNamespace(
        rank=rank, lora=False, cfg=SimpleNamespace(deepspeed=SimpleNamespace(zero_stage=zero_stage)),
        named_weights=lambda mode: ((n, live.copy(t)) for n, t in state.items()),
        hf_model=SimpleNamespace(config=config, __class__=SimpleNamespace(__name__="LlamaForCausalLM")),
        tokenizer=SimpleNamespace(save_pretrained=saved.append), init_path="unused")


def test_export_hf_holds_one_device_tensor_at_a_time_and_loads_back(tiny, tmp_path, monkeypatch):
    from transformers import LlamaForCausalLM
    config, state = tiny
    monkeypatch.setattr(dist, "barrier", lambda *a, **k: None)
    live = LiveBytes()
    me = _standin(live, config, state)
    me.hf_model = LlamaForCausalLM(config)           # only its config and class name are read
    Learner.export_hf(me, tmp_path / "merged", merge_lora=True)

    largest = max(t.numel() * t.element_size() for t in state.values())
    total = sum(t.numel() * t.element_size() for t in state.values())
    assert live.made == total and total > 5 * largest
    assert live.peak <= largest                       # one tensor in flight: at most one bucket
    assert live.alive() == 0
    back = LlamaForCausalLM.from_pretrained(tmp_path / "merged").state_dict()
    for k, v in state.items():
        assert torch.equal(back[k], v), k


def test_other_ranks_gather_only_under_zero3(tiny, tmp_path, monkeypatch):
    config, state = tiny
    monkeypatch.setattr(dist, "barrier", lambda *a, **k: None)
    for stage, expect in ((2, 0), (3, sum(t.numel() * t.element_size() for t in state.values()))):
        live = LiveBytes()
        Learner.export_hf(_standin(live, config, state, rank=1, zero_stage=stage), tmp_path / f"r1-{stage}")
        assert live.made == expect and live.peak <= max(t.numel() * t.element_size() for t in state.values())


def test_to_host_copies_bucket_by_bucket_and_releases_each_device_tensor():
    live = LiveBytes()
    shapes = [(f"w{k}", (64,)) for k in range(20)]           # 256 B each
    seen = []
    for name, t in export.to_host(live.source(shapes), bucket_bytes=1024):
        seen.append((name, t))
        assert live.alive() <= 256                         # the bucket is on the host, not the device side
    assert [n for n, _ in seen] == [n for n, _ in shapes]
    assert all(torch.equal(t, torch.full((64,), float(k))) for k, (_, t) in enumerate(seen))
    assert len({t.untyped_storage().data_ptr() for _, t in seen}) == 5   # 4 tensors per 1 KiB bucket


def test_write_full_shards_when_the_model_exceeds_a_shard(tiny, tmp_path):
    from transformers import LlamaForCausalLM
    config, state = tiny
    total = sum(t.numel() * t.element_size() for t in state.values())
    shards = export.write_full(tmp_path, iter(state.items()), config, "LlamaForCausalLM", bucket_bytes=1 << 16,
                        shard_bytes=total // 3)
    assert shards >= 3 and (tmp_path / "model.safetensors.index.json").exists()
    back = LlamaForCausalLM.from_pretrained(tmp_path).state_dict()
    assert all(torch.equal(back[k], v) for k, v in state.items())
