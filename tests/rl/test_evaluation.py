"""Held-out evaluation: a fixed split the policy never trains on, greedy and sampled, reward and gold."""
import pytest

from rlhf_ray.config import ConfigError, load_config
from rlhf_ray.data.prompts import Prompt
from rlhf_ray.records import Rollout
from rlhf_ray.rl.evaluation import Evaluator, format_eval, split_prompts

PROMPTS = [Prompt(f"p{i}", (1, 10 + i)) for i in range(20)]


def test_split_is_seeded_disjoint_and_only_when_evaluating():
    cfg = load_config(None, ["rl.eval_every=5", "data.rl_eval_prompts=4"])
    train, held = split_prompts(PROMPTS, cfg)
    assert len(held) == 4 and len(train) == 16 and not set(held) & set(train)
    assert split_prompts(PROMPTS, cfg) == (train, held)
    assert split_prompts(PROMPTS, load_config(None, [])) == (PROMPTS, [])
    with pytest.raises(ConfigError, match="data.rl_eval_prompts=20 leaves no training prompts"):
        split_prompts(PROMPTS, load_config(None, ["rl.eval_every=5", "data.rl_eval_prompts=20"]))


def test_evaluator_generates_greedy_and_sampled_and_scores_both():
    cfg = load_config(None, ["rl.eval_every=5", "rl.steps=12", "rl.eval_samples=3", "rollout.temperature=0.7"])
    calls = []

    def generate(ids, n, temperature, seed):
        calls.append((len(ids), n, temperature))
        k = 2 if temperature == 0 else 4  # greedy responses 2 tokens, sampled 4
        idx = [i for i in range(len(ids)) for _ in range(n)]
        return Rollout([list(ids[i]) for i in idx], [[5] * k] * len(idx), [[-1.0] * k] * len(idx),
                       ["good" if temperature == 0 else "bad"] * len(idx), idx,
                       ["stop" if temperature == 0 else "length"] * len(idx), 0, 1.0)

    def score(prompts, responses, finished, seq):
        assert seq.response_mask.shape[0] == len(responses)
        assert finished == [r == "good" for r in responses]  # the sampled ones ran to the limit
        return [1.0 if r == "good" else -1.0 for r in responses], None, None, {}

    ev = Evaluator(PROMPTS[:3], cfg, pad_id=0, gold=lambda p, r: [0.5 if x == "good" else 0.0 for x in r])
    assert [s for s in range(13) if ev.due(s)] == [0, 5, 10, 12]
    m = ev.run(generate, score, 5)
    assert calls == [(3, 1, 0.0), (3, 3, 0.7)]
    assert m == {"eval/greedy_reward": 1.0, "eval/greedy_len": 2.0, "eval/greedy_gold": 0.5,
                 "eval/sampled_reward": -1.0, "eval/sampled_len": 4.0, "eval/sampled_gold": 0.0}
    assert format_eval(5, m) == ("eval @ step    5  greedy reward +1.000 gold +0.500 len 2.0 | "
                                 "sampled reward -1.000 gold +0.000 len 4.0")
    assert not Evaluator([], cfg, pad_id=0).due(0)
