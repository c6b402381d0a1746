"""Full pushes written straight into an in-process engine's layers (`roles.generator.in_place`): the first
push goes through vLLM's reload and checks the loader against it; every later one goes in place and the
engine then computes exactly what vLLM's reload of the same weights makes it compute."""
import pytest
import torch

from rlhf_ray.config.schema import RolloutConfig
from rlhf_ray.utils.device import resolve_backend

from .conftest import hf_logprobs, load_hf, named_weights, perturb

pytestmark = pytest.mark.slow
CFG = RolloutConfig(n_samples_per_prompt=2, temperature=0.7, max_new_tokens=8, kv_cache_gib=1.0, seed=0,
                    enforce_eager=True)  # compiled decoding: test_engine_compiled.py
PROMPTS = [[5, 17, 33, 90, 100], [7, 8, 9], list(range(3, 43))]


@pytest.fixture(scope="module")
def engine(tiny_path):
    from rlhf_ray.roles.generator.engine import GeneratorEngine
    eng = GeneratorEngine(tiny_path, CFG, resolve_backend("cpu", "float32"), lora=False, max_model_len=256)
    yield eng
    eng.close()


def _model(engine):
    return engine.llm.collective_rpc(lambda worker: worker.model_runner.get_model())[0]


def _vllm_reload(engine, named):
    engine.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(list(named))})
    engine.llm.reset_prefix_cache()


def test_pushes_after_the_first_go_in_place_and_compute_what_vllms_reload_does(engine, tiny_path):
    learner = load_hf(tiny_path)
    perturb(learner, seed=21)
    engine.load_full(named_weights(learner), version=1)
    assert not engine.pushed_in_place                   # the first push: vLLM's reload, the loader checked on it
    perturb(learner, seed=22)
    engine.load_full(named_weights(learner), version=2)
    assert engine.pushed_in_place
    ours = engine.generate(PROMPTS, seeds=[1, 2, 3])
    learner_logp, engine_logp, mask = hf_logprobs(learner, ours)
    assert ((learner_logp - engine_logp).abs() * mask).max() < 1e-3   # the engine serves the pushed weights

    _vllm_reload(engine, named_weights(learner))        # the same weights, placed by vLLM
    theirs = engine.generate(PROMPTS, seeds=[1, 2, 3])
    assert ours.response_ids == theirs.response_ids and ours.response_logprobs == theirs.response_logprobs


def test_a_loader_that_places_a_tensor_unlike_vllm_is_not_used(engine, tiny_path):
    from rlhf_ray.roles.generator.in_place import InPlaceLoader

    learner = load_hf(tiny_path)
    perturb(learner, seed=23)
    named = list(named_weights(learner))
    _vllm_reload(engine, named)
    assert InPlaceLoader.matching(_model(engine), named) is not None
    # the MLP's two halves swapped in layer 0: same shapes, so only the kernel check can tell
    swap = {"model.layers.0.mlp.gate_proj.weight": "model.layers.0.mlp.up_proj.weight",
            "model.layers.0.mlp.up_proj.weight": "model.layers.0.mlp.gate_proj.weight"}
    assert InPlaceLoader.matching(_model(engine), [(swap.get(n, n), t) for n, t in named]) is None
    norms = {"model.layers.0.input_layernorm.weight": "model.layers.0.post_attention_layernorm.weight",
             "model.layers.0.post_attention_layernorm.weight": "model.layers.0.input_layernorm.weight"}
    assert InPlaceLoader.matching(_model(engine), [(norms.get(n, n), t) for n, t in named]) is None
    assert InPlaceLoader.matching(_model(engine), named + [("model.layers.0.mlp.nowhere.weight", named[0][1])]) is None
    # a fused layer pushed in part (its staging tensor is new each push: the rest would be garbage)
    assert InPlaceLoader.matching(_model(engine), [(n, t) for n, t in named if n != "model.layers.0.self_attn.k_proj.weight"]) is None
    # the refused checks wrote nothing: the engine still serves the learner's weights
    learner_logp, engine_logp, mask = hf_logprobs(learner, engine.generate(PROMPTS, seeds=[4, 5, 6]))
    assert ((learner_logp - engine_logp).abs() * mask).max() < 1e-3


def test_a_push_with_a_tensor_the_loader_cannot_place_ends_in_vllms_reload(engine, tiny_path):
    """Mid-stream: what came before went in place; the layer being assembled, the odd tensor and the rest go
    to vLLM's reload (which skips a rotary `inv_freq` itself). Every weight of the push is then served."""
    learner = load_hf(tiny_path)
    perturb(learner, seed=24)
    engine.load_full(named_weights(learner), version=engine.version + 1)   # (in place after this module's first)
    perturb(learner, seed=25)
    named = list(named_weights(learner))
    at = [n for n, _ in named].index("model.layers.1.self_attn.q_proj.weight") + 1  # q in, k and v not yet
    odd = ("model.layers.1.self_attn.rotary_emb.inv_freq", torch.ones(4))
    engine.load_full(iter(named[:at] + [odd] + named[at:]), version=engine.version + 1)
    assert not engine.pushed_in_place
    learner_logp, engine_logp, mask = hf_logprobs(learner, engine.generate(PROMPTS, seeds=[7, 8, 9]))
    assert ((learner_logp - engine_logp).abs() * mask).max() < 1e-3
    perturb(learner, seed=26)
    engine.load_full(named_weights(learner), version=engine.version + 1)
    assert engine.pushed_in_place                          # the next ordinary push goes in place again


def test_a_sync_of_the_trained_layers_alone_leaves_the_rest_as_the_engine_holds_it(engine, tiny_path):
    """A LoRA learner's sync (`full_weights(frozen=False)`: the attention, merged, and nothing of the MLP, the
    norms or the embedding) into an engine that holds the base, through vLLM's reload and in place: the engine
    then serves the merged model."""
    from peft import LoraConfig, get_peft_model

    from rlhf_ray.learner.weights import full_weights
    base = load_hf(tiny_path)
    engine.load_full(named_weights(base), version=engine.version + 1)   # as at a run's start: the engine holds the base
    learner = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))

    def synced():
        return list(full_weights(learner.base_model.model, torch.float32, frozen=False))

    def assert_serves_the_learner(seeds):
        learner_logp, engine_logp, mask = hf_logprobs(learner, engine.generate(PROMPTS, seeds=seeds))
        assert ((learner_logp - engine_logp).abs() * mask).max() < 1e-3

    assert {n.split(".")[-2] for n, _ in synced()} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    _vllm_reload(engine, synced())                    # an engine's first sync goes through vLLM's reload
    assert_serves_the_learner([11, 12, 13])
    perturb(learner, seed=27)                         # the adapter trains; the base stays
    engine.load_full(iter(synced()), version=engine.version + 1)
    assert engine.pushed_in_place
    assert_serves_the_learner([14, 15, 16])


@pytest.fixture(scope="module")
def biased_path(tiny_path, tmp_path_factory):
    """The tiny Llama with what it lacks: biases in q/k/v/o and the MLP, grouped-query attention (k and v
    shards narrower than q), tied embeddings."""
    import shutil

    from transformers import AutoConfig, LlamaForCausalLM
    out = tmp_path_factory.mktemp("biased")
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(f"{tiny_path}/{f}", out / f)
    cfg = AutoConfig.from_pretrained(tiny_path)
    cfg.attention_bias, cfg.mlp_bias, cfg.tie_word_embeddings = True, True, True
    cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim = 4, 2, 32
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    model.save_pretrained(out)
    return str(out)


def test_biases_grouped_query_shards_and_a_tied_embedding_go_in_place_too(biased_path):
    """Every push, the first (vLLM's reload) included, serves the pushed weights; the tied lm_head packs the
    embedding's weight into a kernel of its own, which neither vLLM's reload nor the loader reaches by name."""
    from rlhf_ray.roles.generator.engine import GeneratorEngine
    from rlhf_ray.roles.generator.group import tied_names

    engine = GeneratorEngine(biased_path, CFG, resolve_backend("cpu", "float32"), lora=False, max_model_len=256)
    try:
        learner = load_hf(biased_path)
        skip = tied_names(biased_path)
        assert skip                                       # the engine loads the embedding once, as its lm_head too
        for version, seed in ((1, 31), (2, 32), (3, 33)):
            perturb(learner, seed=seed)
            engine.load_full(((n, t) for n, t in named_weights(learner) if n not in skip), version=version)
            assert engine.pushed_in_place == (version > 1)
            learner_logp, engine_logp, mask = hf_logprobs(learner, engine.generate(PROMPTS, seeds=[1, 2, 3]))
            assert ((learner_logp - engine_logp).abs() * mask).max() < 1e-3, version
    finally:
        engine.close()
