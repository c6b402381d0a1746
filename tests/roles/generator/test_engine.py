"""GeneratorEngine without Ray, on the tiny model: weight pushes must change what vLLM computes exactly."""
import pytest
import torch

from rlhf_ray.buckets import pack_buckets, unpack_bucket
from rlhf_ray.config.schema import RolloutConfig, SyncConfig
from rlhf_ray.sync import LogprobMismatchError, check_logprob_agreement, logprob_agreement
from rlhf_ray.utils.device import resolve_backend

from .conftest import adapter_config, cut_at_eos, hf_greedy, hf_logprobs, load_hf, named_weights, perturb

pytestmark = pytest.mark.slow
EOS = 2
NEW = 8
CFG = RolloutConfig(n_samples_per_prompt=2, temperature=0.7, max_new_tokens=NEW, kv_cache_gib=1.0, seed=0)
FP32 = SyncConfig(logprob_max_abs_diff=1e-3, logprob_mean_abs_diff=1e-4)   # fp32 engine vs fp32 learner


def _prompts():
    g = torch.Generator().manual_seed(1)
    short = [torch.randint(3, 500, (k,), generator=g).tolist() for k in (5, 17, 40)]
    long = torch.randint(3, 500, (150,), generator=g).tolist()     # > one 128-token KV block on CPU
    return short + [long, long[:140] + [7, 8, 9]]                   # two long prompts share a cached prefix


TEXT_PROMPTS = ["the movie was", "I think this film", "A", "Honestly, the plot"]


def _greedy(engine, prompts):
    r = engine.generate(prompts, n=1, temperature=0.0)
    return r.response_ids


def _bucketed(named, bucket_bytes=64 * 1024):
    """The full path a sync takes, minus transport: pack into bounded buckets, unpack as views."""
    for bucket in pack_buckets(named, bucket_bytes):
        yield from unpack_bucket(bucket)


@pytest.fixture(scope="module")
def engine(tiny_path):
    from rlhf_ray.roles.generator.engine import GeneratorEngine
    eng = GeneratorEngine(tiny_path, CFG, resolve_backend("cpu"), lora=True, max_model_len=256, max_lora_rank=8)
    yield eng
    eng.close()
    assert not eng._scratch.exists()  # vLLM's rendezvous file and the pushed adapters go with the engine


def test_a_groups_samples_share_their_prompts_prefill(engine):
    """The CPU engine's KV blocks are small enough (32 tokens, `Backend.engine_block_size`) for the samples of
    one prompt to share its full blocks: vLLM's default of 128 cached none of this 70-token prompt."""
    from vllm import SamplingParams
    prompt = {"prompt_token_ids": list(range(300, 370))}  # no other test's prompt: nothing cached before
    out = engine.llm.generate([prompt], SamplingParams(n=4, max_tokens=2), use_tqdm=False)[0]
    assert len(out.outputs) == 4 and out.num_cached_tokens >= 32


def test_vllms_rendezvous_file_is_made_in_the_engines_scratch_not_the_temp_folder(engine):
    import tempfile
    assert [p.name[:10] for p in engine._scratch.iterdir()] == ["vllm_dist_"]
    assert tempfile.gettempdir() != str(engine._scratch)  # the process's own temp folder again after the build


def test_full_sync_greedy_matches_hf_including_long_prompts(engine, tiny_path):
    learner = load_hf(tiny_path)
    prompts = _prompts()
    before = _greedy(engine, prompts)
    assert [cut_at_eos(x) for x in hf_greedy(learner, prompts, NEW)] == before  # version 0 agrees
    perturb(learner, seed=11)
    want = [cut_at_eos(x) for x in hf_greedy(learner, prompts, NEW)]
    assert want != before                                   # the sync must change what the engine says
    engine.load_full(_bucketed(named_weights(learner)), version=1)
    assert engine.version == 1
    assert _greedy(engine, prompts) == want


def test_sampled_logprobs_agree_with_learner_and_skipped_sync_is_caught(engine, tiny_path):
    learner = load_hf(tiny_path)
    perturb(learner, seed=12)
    engine.load_full(_bucketed(named_weights(learner)), version=2)
    rollout = engine.generate(_prompts()[:3], seeds=[5, 6, 7])
    assert rollout.weight_version == 2 and len(rollout) == 6 and rollout.prompt_index == [0, 0, 1, 1, 2, 2]
    assert rollout.temperature == pytest.approx(0.7)
    learner_logp, engine_logp, mask = hf_logprobs(learner, rollout)
    stats = logprob_agreement(learner_logp, engine_logp, mask)
    assert stats.num_tokens > 0
    check_logprob_agreement(stats, FP32, version=2)       # fp32 tolerance
    assert stats.max_abs < 1e-3, stats

    perturb(learner, seed=13)                              # the learner updates, the sync is "forgotten"
    stale = engine.generate(_prompts()[:3], seeds=[5, 6, 7])
    learner_logp, engine_logp, mask = hf_logprobs(learner, stale)
    with pytest.raises(LogprobMismatchError, match="version 2"):
        check_logprob_agreement(logprob_agreement(learner_logp, engine_logp, mask), SyncConfig(), version=2)


def test_same_seed_reproduces_and_n_samples_differ(engine):
    a = engine.generate(_prompts()[:2], n=3, seeds=[1, 2])
    b = engine.generate(_prompts()[:2], n=3, seeds=[1, 2])
    assert a.response_ids == b.response_ids and a.response_logprobs == b.response_logprobs
    assert len({tuple(x) for x in a.response_ids[:3]}) > 1


def test_text_prompts_are_tokenized_answered_and_decoded_like_token_prompts(engine, tiny_path):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_path)
    texts = ["the movie was", "I"]
    r = engine.generate(texts, n=1, temperature=0.0, max_new_tokens=4)
    assert r.prompt_ids == [tok(t).input_ids for t in texts]       # the model's own tokenizer, specials included
    by_ids = engine.generate(r.prompt_ids, n=1, temperature=0.0, max_new_tokens=4)
    assert r.response_ids == by_ids.response_ids and r.response_logprobs == by_ids.response_logprobs
    assert r.texts == [tok.decode(ids, skip_special_tokens=True) for ids in r.response_ids]
    for ids, logp, reason in zip(r.response_ids, r.response_logprobs, r.finish_reasons):
        assert 0 < len(ids) <= 4 and len(logp) == len(ids) and all(lp <= 0 for lp in logp)
        # "length": the 4-token budget ran out; "stop": the model emitted EOS
        assert reason == ("stop" if ids[-1] == EOS else "length") and (reason == "stop" or len(ids) == 4)


def test_responses_decoded_without_vllm_detokenizing_read_as_vllms_own_text(engine):
    """Without stop strings vLLM is told not to decode each token (it costs a fifth of a tiny model's call);
    the engine decodes the responses once instead, and they read as vLLM's own text does."""
    prompts = TEXT_PROMPTS  # (see the stop-string test below for why not random token ids)
    ours = engine.generate(prompts, n=4, max_new_tokens=NEW, stop=[], seeds=[11, 12, 13, 14])
    theirs = engine.generate(prompts, n=4, max_new_tokens=NEW, stop=["\x00\x01never"], seeds=[11, 12, 13, 14])
    assert ours.response_ids == theirs.response_ids and ours.response_logprobs == theirs.response_logprobs
    assert ours.texts == theirs.texts


def _stop_text(text: str) -> str:
    """A 2-character piece of plain ASCII from the middle of `text` whose first occurrence is not at 0."""
    for k in range(len(text) // 2, len(text) - 1):
        piece = text[k:k + 2]
        if piece.isascii() and piece.isprintable() and text.index(piece) > 0:
            return piece
    raise AssertionError(f"no usable stop text in {text!r}")


def test_stop_strings_end_a_response_before_the_stop_text(engine):
    # text prompts: after token ids that end mid-character, vLLM's text (which stop strings need) starts with
    # the prompt's unfinished tail; a response decoded without stop strings is the response's own text
    free = engine.generate(TEXT_PROMPTS[:3], n=1, max_new_tokens=NEW, stop=[], seeds=[21, 22, 23])
    # stop on a piece of each seeded continuation: the response must end right before its first occurrence
    for prompt, seed, text, ids in zip(TEXT_PROMPTS[:3], [21, 22, 23], free.texts, free.response_ids):
        stop = _stop_text(text)
        cut = engine.generate([prompt], n=1, max_new_tokens=NEW, stop=[stop], seeds=[seed])
        assert cut.finish_reasons == ["stop"], (text, stop)
        assert cut.texts[0] == text[:text.index(stop)] and stop not in cut.texts[0], (text, stop, cut.texts)
        assert len(cut.response_ids[0]) < len(ids)
        assert len(cut.response_logprobs[0]) == len(cut.response_ids[0])


def test_lora_sync_matches_hf_peft_and_new_version_replaces_old(engine, tiny_path):
    from peft import LoraConfig, get_peft_model
    base = load_hf(tiny_path)
    engine.load_full(_bucketed(named_weights(base)), version=3)     # back to the base the adapter sits on
    policy = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"],
                                             init_lora_weights=False))
    prompts = _prompts()
    for version, seed in ((4, 21), (5, 22)):
        perturb(policy, seed=seed, scale=0.2)                         # only the adapter is trainable
        engine.load_adapter(_bucketed(named_weights(policy, "adapter")), adapter_config(policy), version=version)
        assert engine.version == version
        assert _greedy(engine, prompts) == [cut_at_eos(x) for x in hf_greedy(policy, prompts, NEW)]
        rollout = engine.generate(prompts[:2], seeds=[3, 4])
        learner_logp, engine_logp, mask = hf_logprobs(policy, rollout)
        check_logprob_agreement(logprob_agreement(learner_logp, engine_logp, mask), FP32, version=version)


def test_older_version_is_refused(engine, tiny_path):
    with pytest.raises(ValueError, match="older"):
        engine.load_full(iter([]), version=0)
