import pytest
import torch

from rlhf_ray.buckets import ALIGN, Bucket, pack_buckets, total_bytes, unpack_bucket


def _named():
    g = torch.Generator().manual_seed(0)
    return [
        ("a.weight", torch.randn(3, 5, generator=g)),                       # 60 B
        ("a.bias", torch.randn(5, generator=g).to(torch.bfloat16)),         # 10 B, other dtype
        ("b.weight", torch.randn(40, generator=g)),                         # 160 B
        ("c.weight", torch.randn(100, 3, generator=g)),                     # 1200 B, over the bucket size
        ("d.ids", torch.arange(7, dtype=torch.int64)),                      # 56 B
        ("e.scalar", torch.tensor(2.5)),                                    # 0-d
    ]


def test_round_trip_is_exact_and_keeps_order_names_shapes_dtypes():
    named = _named()
    buckets = list(pack_buckets(iter(named), bucket_bytes=256))
    out = [nt for b in buckets for nt in unpack_bucket(b)]
    assert [n for n, _ in out] == [n for n, _ in named]
    for (_, want), (_, got) in zip(named, out):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got, want)


def test_bucket_bounds_and_alignment():
    buckets = list(pack_buckets(_named(), bucket_bytes=256))
    # a.weight(60) + a.bias at 64 (10) + b.weight at 128 (160) = 288 > 256 -> b.weight starts bucket 2
    assert [[s.name for s in b.specs] for b in buckets] == [
        ["a.weight", "a.bias"], ["b.weight"], ["c.weight"], ["d.ids", "e.scalar"]]
    for b in buckets:
        assert b.buffer.dtype == torch.uint8 and b.buffer.is_contiguous() and b.buffer.dim() == 1
        assert all(s.offset % ALIGN == 0 for s in b.specs)
        last = b.specs[-1]
        assert b.nbytes == last.offset + last.nbytes
        if len(b.specs) > 1:
            assert b.nbytes <= 256           # only a lone oversized tensor may exceed the bound
    assert buckets[2].nbytes == 1200
    assert total_bytes(buckets) == sum(t.numel() * t.element_size() for _, t in _named())


def test_unpack_is_zero_copy_views_into_the_buffer():
    (bucket,) = list(pack_buckets([("x", torch.ones(4)), ("y", torch.zeros(2))], bucket_bytes=1 << 20))
    (_, x), (_, y) = unpack_bucket(bucket)
    assert x.untyped_storage().data_ptr() == bucket.buffer.untyped_storage().data_ptr()
    bucket.buffer.zero_()
    assert torch.equal(x, torch.zeros(4))


def test_pack_copies_so_later_changes_to_the_source_do_not_leak():
    src = torch.ones(8)
    (bucket,) = list(pack_buckets([("w", src)], bucket_bytes=1024))
    src.mul_(3)
    assert torch.equal(unpack_bucket(bucket)[0][1], torch.ones(8))


def test_cast_on_pack_and_non_float_kept():
    named = [("w", torch.randn(4, 4)), ("i", torch.arange(3))]
    (bucket,) = list(pack_buckets(named, bucket_bytes=1 << 20, dtype=torch.bfloat16))
    (_, w), (_, i) = unpack_bucket(bucket)
    assert w.dtype == torch.bfloat16 and torch.equal(w, named[0][1].to(torch.bfloat16))
    assert i.dtype == torch.int64 and torch.equal(i, named[1][1])


def test_lazy_consumption_holds_one_bucket_of_inputs():
    seen = []

    def gen():
        for k in range(6):
            seen.append(k)
            yield f"p{k}", torch.full((16,), float(k))   # 64 B each, 4 per 256-B bucket

    it = pack_buckets(gen(), bucket_bytes=256)
    first = next(it)
    assert [s.name for s in first.specs] == ["p0", "p1", "p2", "p3"]
    assert seen == [0, 1, 2, 3, 4]        # the 5th tensor is what closed the first bucket


def test_empty_input_and_bad_size():
    assert list(pack_buckets([], 64)) == []
    with pytest.raises(ValueError, match="bucket_bytes"):
        list(pack_buckets([("w", torch.ones(1))], 0))


def test_non_contiguous_input_packs_its_logical_values():
    t = torch.arange(12.0).view(3, 4).t()     # (4, 3) transposed view
    (bucket,) = list(pack_buckets([("t", t)], 1024))
    assert torch.equal(unpack_bucket(bucket)[0][1], t)
    assert isinstance(bucket, Bucket)


def test_reuse_packs_into_one_buffer_and_each_bucket_is_right_when_yielded():
    named = _named()
    seen, ptrs = [], set()
    for bucket in pack_buckets(named, bucket_bytes=256, reuse=True):
        ptrs.add(bucket.buffer.untyped_storage().data_ptr())
        seen += [(n, t.clone()) for n, t in unpack_bucket(bucket)]
    assert len(ptrs) <= 2                      # one arena, regrown once for the oversized tensor
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(seen, named)) and len(seen) == len(named)


def test_specs_round_trip_through_the_json_header():
    from rlhf_ray.buckets import decode_specs, encode_specs
    for b in pack_buckets(_named(), bucket_bytes=256):
        raw = encode_specs(b.specs)
        assert raw.startswith(b"[") and decode_specs(raw, b.nbytes) == b.specs


@pytest.mark.parametrize("raw, why", [
    (b"\x80\x05\x95", "not the JSON spec list"),                                   # a pickle's first bytes
    (b'{"a": 1}', "JSON list"),
    (b'[["w", [4], "float32", 0, 15]]', "does not fit"),                          # bytes disagree with shape
    (b'[["w", [4], "float32", 64, 16]]', "does not fit"),                         # past the buffer's end
    (b'[["w", [4], "float32", 8, 16]]', "does not fit"),                          # unaligned
    (b'[["w", [4], "Tensor", 0, 16]]', "unknown dtype"),
    (b'[["w", [4], "__import__", 0, 16]]', "unknown dtype"),
    (b'[["w", [-4], "float32", 0, 16]]', "bad tensor spec"),
])
def test_decode_refuses_what_is_not_a_well_formed_header(raw, why):
    from rlhf_ray.buckets import decode_specs
    with pytest.raises(ValueError, match=why):
        decode_specs(raw, 64)


def test_each_tensor_is_released_as_soon_as_it_is_packed():
    """No reference to a packed tensor is kept: while the producer makes tensor k, tensor k-1 is gone, so a
    producer on a GPU holds one tensor, never a bucket's worth of them, beside the bucket."""
    from tests.sync.live_bytes import LiveBytes
    live = LiveBytes()
    shapes = [(f"p{k}", (16,)) for k in range(12)]           # 64 B each, 4 per 256-B bucket
    assert len(list(pack_buckets(live.source(shapes), bucket_bytes=256))) == 3
    assert live.peak == 64 and live.made == 12 * 64
