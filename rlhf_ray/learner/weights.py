"""Hand out a model's weights as `(name, tensor)` pairs, one parameter at a time.

full:    names exactly as in the plain HF model's `state_dict()` (`model.layers.0.self_attn.q_proj.weight`,
         `lm_head.weight`, both names of tied weights), LoRA merged in (W + scale * B @ A), 4-bit bases
         dequantized; the peft-only copies (`original_module`, `lora_*`) never appear. A sync asks for the
         part that training changes (`frozen=False`, `trained_modules`); an export for all of it.
adapter: names as in `peft.get_peft_model_state_dict(model)` (what `adapter_model.safetensors` holds).
Under ZeRO-3 each module's parameters are gathered just around their own use, so peak memory is one
module, not one model. Every rank must iterate (the gather is a collective); the tensors handed out are
copies owned by the caller.
"""
from __future__ import annotations

import collections
from typing import Iterable, Iterator

import torch

NamedTensor = tuple[str, torch.Tensor]


def without(named: Iterable[NamedTensor], skip: frozenset) -> Iterator[NamedTensor]:
    """`(name, tensor)` pairs but those named in `skip` (a tied lm_head that an engine does not load)."""
    return ((n, t) for n, t in named if n not in skip)


def drain(named: Iterator[NamedTensor]) -> None:
    """A rank that does not consume the weights still iterates them, keeping nothing: under ZeRO-3 every
    tensor is gathered by a collective that all ranks must join (the consumer is rank 0)."""
    collections.deque(named, maxlen=0)


def _gathered(params):
    import deepspeed
    # A no-op for parameters that ZeRO-3 does not partition (they carry no `ds_id`).
    return deepspeed.zero.GatheredParameters([p for p in params if hasattr(p, "ds_id")], modifier_rank=None)


def _handed(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`t` in `dtype` for a consumer that is done with it before the learner's next step: the parameter
    itself where nothing needs converting (its engine, bucket or file copies it anyway: a second copy here
    cost a full sync of the tiny model 1.7 ms of 17), a converted copy otherwise, and always a copy of a
    ZeRO-3 parameter, whose gathered storage is released when its gather ends."""
    own = t.detach()
    if own.dtype != dtype:
        return own.to(dtype)
    return own.clone() if hasattr(t, "ds_id") else own


def _is_4bit(t: torch.Tensor) -> bool:
    return type(t).__name__ == "Params4bit"


def _dense_weight(module: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """A linear layer's weight as a dense tensor (dequantized when it is a bitsandbytes 4-bit weight)."""
    if _is_4bit(module.weight):
        from peft.utils.integrations import dequantize_module_weight
        return dequantize_module_weight(module).to(dtype)
    return module.weight.detach().to(dtype, copy=True)  # its own: a LoRA delta is added in place


def _own_state(module: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """A module's own (non-recursive) parameters and persistent buffers, as `state_dict` lists them."""
    for name, p in module.named_parameters(recurse=False):
        yield name, p
    for name, b in module.named_buffers(recurse=False):
        if name not in module._non_persistent_buffers_set:
            yield name, b


def _peft_layers() -> tuple:
    """(peft's LoraLayer, ModulesToSaveWrapper), or empty classes where this process never imported peft (then
    no module can be one of its layers)."""
    from rlhf_ray.learner.build import peft_loaded
    if peft_loaded() is None:
        return (), ()
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper
    return LoraLayer, ModulesToSaveWrapper


def trained_modules(hf_model: torch.nn.Module) -> frozenset[str]:
    """Names of the modules whose weights an optimizer step can change (a LoRA layer, peft's trained copy of
    a module, a module with a parameter that requires grad) and of every sibling of one (the modules beside it
    in the same parent). Siblings go with it because an engine fuses them: vLLM keeps q/k/v in one `qkv_proj`
    and gate/up in one `gate_up_proj`, and a push that brought q and v of a fused layer but not k would leave
    k's rows to whatever the engine's reload allocates. Everything else never changes in a run, and every
    engine starts from exactly it (`rlhf_ray.placement.shared.generator_base`)."""
    LoraLayer, ModulesToSaveWrapper = _peft_layers()
    modules = list(hf_model.named_modules())
    trained = [name for name, m in modules if isinstance(m, (LoraLayer, ModulesToSaveWrapper))
               or any(p.requires_grad for p in m.parameters(recurse=False))]
    parents = {name.rpartition(".")[0] for name in trained}
    return frozenset(trained) | frozenset(name for name, _ in modules if name and name.rpartition(".")[0] in parents)


def full_weights(hf_model: torch.nn.Module, dtype: torch.dtype, frozen: bool = True) -> Iterator[NamedTensor]:
    """Plain-HF names and tensors of `hf_model` (the model inside peft, LoRA layers injected in place).
    A tensor already in `dtype` and not gathered by ZeRO-3 is the live parameter itself (`_handed`): the
    consumer reads or copies it before the learner's next step, as every sync and export does.
    frozen=False: only the `trained_modules`' tensors, what a weight sync carries. A LoRA run on q/k/v/o of
    SmolLM2-135M then syncs 106 of its 538 MB (fp32), and the engine packs a quarter of its layers again
    instead of all of them: the engine's side of a push 40 ms against 150 (AMD EPYC Zen 4, fp32)."""
    LoraLayer, ModulesToSaveWrapper = _peft_layers()
    keep = None if frozen else trained_modules(hf_model)
    handled = None   # "name." of the last module handed out whole: `named_modules` lists its inner ones next
    for mod_name, module in hf_model.named_modules():
        if handled is not None and mod_name.startswith(handled):
            continue
        if keep is not None and mod_name not in keep:
            continue
        prefix = mod_name + "." if mod_name else ""
        if isinstance(module, LoraLayer):
            handled = prefix
            base = module.get_base_layer()
            with _gathered(list(module.parameters())):
                weight = _dense_weight(base, dtype)
                for adapter in module.active_adapters:
                    if adapter in module.lora_A and not module.disable_adapters:
                        weight += module.get_delta_weight(adapter).to(dtype)
                yield prefix + "weight", weight
                del weight  # the consumer has its copy (a host bucket): not kept while the bias is made
                if getattr(base, "bias", None) is not None:
                    yield prefix + "bias", _handed(base.bias, dtype)
        elif isinstance(module, ModulesToSaveWrapper):
            handled = prefix
            active = module.modules_to_save[module.active_adapters[0]] if not module.disable_adapters \
                else module.original_module
            with _gathered(list(active.parameters())):
                for name, t in active.state_dict(keep_vars=True).items():
                    yield prefix + name, _handed(t, dtype)
        else:
            own = list(_own_state(module))
            if not own:
                continue
            with _gathered([t for _, t in own]):
                for name, t in own:
                    if name == "weight" and _is_4bit(t):
                        yield prefix + name, _dense_weight(module, dtype)
                    else:
                        yield prefix + name, _handed(t, dtype if t.is_floating_point() else t.dtype)


def adapter_weights(peft_model: torch.nn.Module) -> Iterator[NamedTensor]:
    """peft's adapter state dict (LoRA A/B and the `modules_to_save` heads), gathered one tensor at a time."""
    from peft import get_peft_model_state_dict
    live = peft_model.state_dict(keep_vars=True)
    by_id = {id(v): k for k, v in live.items()}
    for name, t in get_peft_model_state_dict(peft_model, state_dict=live).items():
        if id(t) not in by_id:
            raise RuntimeError(f"peft returned a copy for adapter tensor {name!r}; cannot gather it")
        with _gathered([t]):
            yield name, t.detach().clone()
