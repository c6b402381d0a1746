"""What a full-weight iteration hands its consumer (a sync, an export): no copy that the consumer makes anyway,
but its own tensor wherever the learner's would change or vanish under it."""
import torch

from rlhf_ray.learner.weights import _handed, full_weights


def test_a_live_weight_in_the_wanted_dtype_is_handed_without_a_copy():
    p = torch.nn.Parameter(torch.randn(4, 4))
    out = _handed(p, torch.float32)
    assert out.data_ptr() == p.data_ptr() and not out.requires_grad


def test_a_conversion_is_its_own_tensor():
    p = torch.nn.Parameter(torch.randn(4, 4))
    out = _handed(p, torch.bfloat16)
    assert out.dtype == torch.bfloat16 and out.data_ptr() != p.data_ptr()


def test_a_zero3_parameter_is_copied_before_its_gather_is_released():
    p = torch.nn.Parameter(torch.randn(4, 4))
    p.ds_id = 7  # what ZeRO-3 marks a partitioned parameter with; its gathered storage goes when the gather ends
    out = _handed(p, torch.float32)
    assert out.data_ptr() != p.data_ptr() and torch.equal(out, p.detach())


def test_a_lora_layer_is_merged_into_a_copy_and_the_base_stays_as_it_was():
    from peft import LoraConfig, get_peft_model
    model = torch.nn.Sequential()
    model.add_module("proj", torch.nn.Linear(8, 8))
    peft = get_peft_model(model, LoraConfig(r=2, target_modules=["proj"], init_lora_weights=False))
    base = peft.base_model.model.proj.base_layer.weight.detach().clone()
    named = dict(full_weights(peft.base_model.model, torch.float32))
    assert not torch.equal(named["proj.weight"], base)                      # the delta is in
    assert torch.equal(peft.base_model.model.proj.base_layer.weight, base)  # ... not in the base
    assert named["proj.bias"].data_ptr() == peft.base_model.model.proj.base_layer.bias.data_ptr()


def _block() -> torch.nn.Module:
    """A decoder block's shape: attention q/k/v/o and an MLP under their own parents, a norm beside them."""
    block = torch.nn.Module()
    block.self_attn = torch.nn.ModuleDict({n: torch.nn.Linear(8, 8) for n in ("q_proj", "k_proj", "v_proj", "o_proj")})
    block.mlp = torch.nn.ModuleDict({n: torch.nn.Linear(8, 8) for n in ("gate_proj", "up_proj")})
    block.norm = torch.nn.LayerNorm(8)
    return block


def test_a_sync_of_a_lora_model_carries_the_adapted_layers_and_their_siblings_only():
    """LoRA on q and v: the sync takes all of the attention (an engine fuses q/k/v into one layer, so k goes with
    them, merged ones first-hand and k as it is), nothing of the MLP or the norm; an export takes everything."""
    from peft import LoraConfig, get_peft_model
    peft = get_peft_model(_block(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model = peft.base_model.model
    synced = dict(full_weights(model, torch.float32, frozen=False))
    assert sorted(synced) == sorted(f"self_attn.{m}.{p}" for m in ("q_proj", "k_proj", "v_proj", "o_proj")
                                    for p in ("weight", "bias"))
    assert not torch.equal(synced["self_attn.q_proj.weight"], model.self_attn.q_proj.base_layer.weight)  # merged
    assert torch.equal(synced["self_attn.k_proj.weight"], model.self_attn.k_proj.weight)
    assert sorted(dict(full_weights(model, torch.float32))) == sorted(_block().state_dict())


def test_a_sync_of_a_model_trained_whole_carries_all_of_it():
    model = _block()
    assert [n for n, _ in full_weights(model, torch.float32, frozen=False)] == list(model.state_dict())
