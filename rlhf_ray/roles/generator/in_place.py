"""A full weight push into an in-process CPU engine, written straight into its layers.

vLLM's CPU linear layers keep no plain weight: each packs its weight into a oneDNN handle and drops the
tensor (`dispatch_cpu_unquantized_gemm(remove_weight=True)`). So a push cannot copy into parameters; vLLM's
`reload_weights` rebuilds every layer on the meta device, runs each weight loader twice (once on meta
tensors to count what arrived), then packs again. Measured on the tiny 3.7M model in bf16 (AMD EPYC Zen 5):
8.8 ms a push alone, 13.9 ms inside a colocated rank; half the tiny step's framework overhead. Packing
itself (creating the handles) is 3-4 ms of it.

`InPlaceLoader` does only the necessary part: each pushed tensor copied into its layer's staging tensor (a
fused layer's shard at its offset: the model's `packed_modules_mapping`, q/k/v -> qkv_proj, and the layer's
`output_partition_sizes`) or straight into its parameter, and each layer, once complete, packed again by its
own `quant_method.process_weights_after_loading` as at load time; its staging tensor goes with it, so a push
holds one layer's copy at a time. Tiny: 3.7 ms a push alone, 6.4 in the rank; SmolLM2-135M bf16: 70 ms
against vLLM's 129.

It is checked against vLLM before it is trusted: an engine's first push goes through `reload_weights` (the
only push that holds all its tensors at once), and `InPlaceLoader.matching` then stages the same tensors and
compares every layer's own kernel output on a probe input (and every copied parameter) with what it staged.
A model it cannot map (a name it cannot resolve, a shape that does not fit, a quantized layer) or whose check
disagrees keeps vLLM's reload for the run; a later push that brings a tensor it cannot place hands that
tensor and the rest of the push to vLLM's reload.
"""
from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional

import torch

log = logging.getLogger(__name__)


class Unmapped(Exception):
    """A pushed tensor this loader cannot place."""


@dataclass(frozen=True)
class Slot:
    module: torch.nn.Module
    param: str
    offset: int     # first row of this tensor in the target (a fused layer's shard); 0 otherwise
    packed: bool    # the target keeps no plain weight (it is staged, then packed)


def _plain_methods() -> tuple[type, ...]:
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod
    from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod
    return UnquantizedLinearMethod, UnquantizedEmbeddingMethod


class InPlaceLoader:
    """Where each pushed tensor of one engine's model goes (planned on first sight of a name and shape), and
    the push itself."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        packed = getattr(model, "packed_modules_mapping", None) or {}
        self._fused = {part: (fused, i) for fused, parts in packed.items() for i, part in enumerate(parts)}
        self._slots: dict[tuple, Slot] = {}
        self._followers = tied_followers(model)
        self._plain = _plain_methods()

    # -- planning: where each pushed tensor goes -------------------------------------------------------
    def _module(self, path: str) -> Optional[torch.nn.Module]:
        try:
            module = self.model.get_submodule(path)
        except AttributeError:
            return None
        return getattr(module, "base_layer", module)  # a LoRA-wrapped layer's own weights live in its base

    def _slot(self, name: str, shape: torch.Size) -> Slot:
        key = (name, tuple(shape))
        if key in self._slots:
            return self._slots[key]
        path, _, param = name.rpartition(".")
        module, offset = self._module(path), 0
        if module is None:  # a part of a fused layer: model.layers.0.self_attn.q_proj -> ...qkv_proj, shard 0
            parent, _, leaf = path.rpartition(".")
            fused, i = self._fused.get(leaf, (None, 0))
            module = self._module(f"{parent}.{fused}" if parent else fused) if fused else None
            sizes = getattr(module, "output_partition_sizes", None)
            if module is None or sizes is None or len(sizes) <= i or sizes[i] != shape[0]:
                raise Unmapped(f"{name}: no layer of the engine's model takes it")
            offset = sum(sizes[:i])
        target = getattr(module, param, None)
        method = getattr(module, "quant_method", None)
        if not isinstance(target, torch.Tensor) or (method is not None and not isinstance(method, self._plain)):
            raise Unmapped(f"{name}: not a plain tensor of the engine's model")
        packed = param == "weight" and target.numel() == 0 and method is not None
        if packed and not hasattr(module, "output_partition_sizes"):
            raise Unmapped(f"{name}: a packed layer of a kind this loader does not know")
        rows = self._rows(module) if packed else target.shape[0] if target.dim() else 0
        cols = (self._in_features(module),) if packed else tuple(target.shape[1:])
        if tuple(shape[1:]) != cols or offset + (shape[0] if shape else 0) > rows:
            raise Unmapped(f"{name}: shape {tuple(shape)} does not fit the engine's layer")
        slot = self._slots[key] = Slot(module, param, offset, packed)
        return slot

    @staticmethod
    def _rows(module) -> int:
        return sum(module.output_partition_sizes)

    @staticmethod
    def _in_features(module) -> int:
        """A packed layer's input width (it keeps no weight to read it from)."""
        return getattr(module, "input_size_per_partition", getattr(module, "input_size", -1))

    # -- loading ---------------------------------------------------------------------------------------
    def _stream(self, named: Iterable[tuple[str, torch.Tensor]], write: bool = True,
                rest: Optional[Callable[[Iterator[tuple[str, torch.Tensor]]], None]] = None
                ) -> Iterator[tuple[torch.nn.Module, Optional[torch.Tensor]]]:
        """Take `named` as it streams in (a sync's buckets one at a time): each tensor copied into its
        parameter (`write`; else compared with what is there) or into its packed layer's staging tensor.
        Yields (layer, staging tensor) for each packed layer once all its rows are in, and its staging tensor
        then goes (a push holds one layer's copy, not a model's); (layer, None) for a kept tensor that changed
        (written, a layer whose kernel packs it too: packed again; compared: it differs from what is there).
        A tensor it cannot place, and a packed layer left incomplete at the end, raise `Unmapped`, or with
        `rest` go to it with the rest of the stream (the parts of layers not yet complete first)."""
        staging: dict[torch.nn.Module, tuple[torch.Tensor, list]] = {}  # layer -> staging tensor, its parts so far

        def pending() -> list[tuple[str, torch.Tensor]]:
            return [part for _, parts in staging.values() for part in parts]

        stream = iter(named)
        with torch.no_grad():
            for name, t in stream:
                try:
                    slot = self._slot(name, t.shape)
                except Unmapped:
                    if rest is None:
                        raise
                    rest(itertools.chain(pending(), [(name, t)], stream))
                    return
                m = slot.module
                if not slot.packed:
                    view = _view(slot, t)
                    changed = not torch.equal(view, t.to(view.dtype))
                    if write and changed:
                        view.copy_(t)
                    # a kept weight that a kernel packs too (an embedding, for its tied lm_head) is packed again
                    # only if it changed: a LoRA run never changes the embedding (2 x 35 ms a SmolLM2 push)
                    packs = slot.param == "weight" and getattr(m, "quant_method", None) is not None
                    if changed and (packs or not write):
                        yield m, None
                    continue
                if m not in staging:
                    staging[m] = (torch.empty(self._rows(m), self._in_features(m), dtype=m.params_dtype), [])
                buf, parts = staging[m]
                buf[slot.offset:slot.offset + t.shape[0]].copy_(t)
                parts.append((name, t))
                if sum(p.shape[0] for _, p in parts) == self._rows(m):
                    del staging[m]
                    yield m, buf
        if staging:
            if rest is None:
                raise Unmapped(f"{type(next(iter(staging))).__name__}: only part of its rows pushed")
            rest(iter(pending()))

    def load(self, named: Iterable[tuple[str, torch.Tensor]],
             rest: Callable[[Iterator[tuple[str, torch.Tensor]]], None]) -> None:
        """Write `named` (HF names) into the model, packing each layer again as it completes. What it cannot
        place (a name the first push did not have, a fused layer pushed in part) goes, with the rest of the
        push, to `rest` (vLLM's reload, which keeps the layers it gets nothing for)."""
        for m, staged in self._stream(named, rest=rest):
            if staged is not None:  # the layer packs it, then drops it
                m.weight = torch.nn.Parameter(staged, requires_grad=False)
            for layer in (m, *self._followers.get(m, ())):
                layer.quant_method.process_weights_after_loading(layer)

    # -- the check against vLLM's own reload -----------------------------------------------------------
    @classmethod
    def matching(cls, model: torch.nn.Module, named: list[tuple[str, torch.Tensor]]) -> Optional["InPlaceLoader"]:
        """Right after vLLM's `reload_weights` loaded `named`: a loader whose placement reproduces what vLLM
        built (each packed layer's kernel on a probe input against the staged weight; every other tensor
        equal to what vLLM put there), or None (logged) when it cannot place them or disagrees. Writes
        nothing."""
        loader = cls(model)
        try:
            for m, staged in loader._stream(named, write=False):
                if staged is None or not _same_kernel(m, staged):  # None: a kept tensor that differs
                    log.info("weight pushes use vLLM's reload: %s differs from what vLLM loaded", type(m).__name__)
                    return None
        except Unmapped as e:
            log.info("weight pushes use vLLM's reload: %s", e)
            return None
        return loader


def tied_followers(model: torch.nn.Module) -> dict[torch.nn.Module, list[torch.nn.Module]]:
    """Layer -> the layers that share its weight: a tied lm_head, which vLLM's `tie_weights` gives the
    embedding's parameter. On a CPU each packs that weight into a kernel of its own, and no pushed name is
    the follower's, so neither vLLM's reload nor this loader would pack it again: its logits came from the
    weights the engine started with (a tied tiny Llama, two pushes of perturbed weights: the engine's log-probs
    off the learner's by up to 2.9, where the run's agreement check stops at 0.5). A LoRA run never changes
    the embedding, which is why SmolLM2's runs agreed."""
    leaders: dict[int, torch.nn.Module] = {}
    out: dict[torch.nn.Module, list[torch.nn.Module]] = {}
    for m in model.modules():
        w = m._parameters.get("weight") if getattr(m, "quant_method", None) is not None else None
        if w is None:
            continue
        leader = leaders.setdefault(id(w), m)
        if leader is not m:
            out.setdefault(leader, []).append(m)
    return out


def pack_followers(model: torch.nn.Module) -> None:
    """After vLLM's reload: pack each tied follower again from its leader's new weight (`tied_followers`)."""
    for followers in tied_followers(model).values():
        for layer in followers:
            layer.quant_method.process_weights_after_loading(layer)


def _view(slot: Slot, t: torch.Tensor) -> torch.Tensor:
    """The part of `slot`'s parameter that `t` fills."""
    target = getattr(slot.module, slot.param)
    return target[slot.offset:slot.offset + t.shape[0]] if t.dim() else target


def _same_kernel(module: torch.nn.Module, weight: torch.Tensor) -> bool:
    """The layer's own kernel (vLLM's packed weight) and a plain fp32 matmul with `weight` agree on a probe
    (within the rounding of the kernel's dtype; a misplaced shard is off by the size of the output). A
    kernel that cannot run the probe counts as disagreeing."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, weight.shape[1], generator=g).to(weight.dtype)
    bias = getattr(module, "bias", None)
    try:
        with torch.no_grad():
            got = module.quant_method.apply(module, x, bias).float()
            want = torch.nn.functional.linear(x.float(), weight.float(), None if bias is None else bias.float())
    except Exception as e:  # noqa: BLE001 - any failure here means: keep vLLM's reload
        log.info("the probe of %s failed: %s", type(module).__name__, e)
        return False
    return bool(got.shape == want.shape and (got - want).norm() <= 1e-2 * want.norm() + 1e-6)
