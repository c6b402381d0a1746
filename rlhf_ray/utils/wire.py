"""Tensors across Ray calls without torch's pickling.

torch pickles a tensor's storage by writing it with `torch.save` into bytes and reads it back with
`torch.load`: on a 2-core host, 12 small tensors (about one train batch) took 0.6 ms to pickle and 0.4 ms to
load, 1.7 ms of a 2.2 ms actor round trip, and an RL step hands batches over several times. Here a plain CPU
tensor crosses as its raw bytes (a NumPy array: pickle protocol 5 sends it out of band, uncopied) with its
dtype and shape, and arrives as a tensor of its own (one copy out of the object store's shared, read-only
buffer), as torch's pickling gives. Everything else (a GPU, sparse, quantized or nested tensor) keeps
torch's own way, as before.

`install()` runs in the driver once Ray is up and in every role process (`runtime.setup_role_process`);
a process that did not install it still reads what one that did sends (`from_wire` is found by name).
"""
from __future__ import annotations

import io

import torch


def _plain(t: torch.Tensor) -> bool:
    """A dense CPU tensor whose bytes are all there is to it."""
    return (t.device.type == "cpu" and t.layout == torch.strided and not t.is_quantized and not t.is_nested
            and not t.is_conj() and not t.is_neg())


def to_wire(t: torch.Tensor) -> tuple:
    if not _plain(t):
        buf = io.BytesIO()
        torch.save(t, buf)
        return ("torch", buf.getvalue())
    flat = t.detach().contiguous().reshape(-1)
    raw = flat.view(torch.uint8).numpy() if flat.numel() else b""  # an empty tensor has no byte view
    return ("raw", raw, t.dtype, tuple(t.shape), t.requires_grad)


def from_wire(obj: tuple) -> torch.Tensor:
    if obj[0] == "torch":
        return torch.load(io.BytesIO(obj[1]), weights_only=True)
    _, raw, dtype, shape, requires_grad = obj
    t = torch.from_numpy(raw.copy()).view(dtype).reshape(shape) if len(raw) else torch.empty(shape, dtype=dtype)
    return t.requires_grad_() if requires_grad else t


def install() -> None:
    """Use `to_wire` / `from_wire` for every `torch.Tensor` this process sends (not its subclasses, e.g.
    `nn.Parameter`, which keep torch's pickling). Needs a connected Ray worker or driver."""
    from ray.util import register_serializer
    register_serializer(torch.Tensor, serializer=to_wire, deserializer=from_wire)

