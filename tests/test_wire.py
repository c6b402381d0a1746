"""Tensors cross Ray calls as raw bytes (`rlhf_ray.utils.wire`) and arrive as tensors of their own, equal to
what was sent; what is not a plain CPU tensor keeps torch's pickling."""
import pickle
import warnings

import pytest
import torch

from rlhf_ray.utils.wire import from_wire, to_wire


def crossed(t: torch.Tensor) -> torch.Tensor:
    return from_wire(pickle.loads(pickle.dumps(to_wire(t), protocol=5)))


@pytest.mark.parametrize("t", [
    torch.randn(3, 5), torch.randn(4, 6).to(torch.bfloat16), torch.randint(0, 9, (2, 3)), torch.tensor(7.5),
    torch.zeros(0, 4), torch.rand(3, 3) > 0.5, torch.randn(5, 3).t(),  # the last one not contiguous
], ids=["fp32", "bf16", "int64", "scalar", "empty", "bool", "transposed"])
def test_a_tensor_arrives_equal_in_dtype_shape_and_values(t):
    out = crossed(t)
    assert out.dtype == t.dtype and out.shape == t.shape and torch.equal(out, t)


def test_it_arrives_as_its_own_writable_tensor_and_keeps_requires_grad():
    t = torch.randn(4, 4, requires_grad=True)
    out = crossed(t)
    assert out.requires_grad and out.is_leaf
    with torch.no_grad():
        out.add_(1)
    assert not torch.equal(out, t)


def test_a_view_sends_its_own_bytes_not_the_whole_storage():
    big = torch.randn(1000, 100)
    tag, raw, *_ = to_wire(big[:2])
    assert tag == "raw" and raw.nbytes == 2 * 100 * 4  # torch's pickling sends all 400 kB of the storage


def test_a_sparse_tensor_keeps_torchs_own_way():
    t = torch.randn(4, 4).to_sparse()
    assert to_wire(t)[0] == "torch"
    assert torch.equal(crossed(t).to_dense(), t.to_dense())


@pytest.mark.slow
@pytest.mark.parametrize("rows", [4, 40_000], ids=["inline", "object-store"])
def test_through_ray_a_tensor_is_read_back_unchanged_after_the_reader_writes_to_its_copy(ray_local, rows):
    from rlhf_ray.utils import wire
    wire.install()
    ref = ray_local.put(torch.arange(rows * 4, dtype=torch.float32).reshape(rows, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns when handed a read-only buffer it would write into
        first = ray_local.get(ref)
        first.add_(1)
    assert float(ray_local.get(ref)[0, 0]) == 0.0
