"""The episode loop and the controller over it, engine-free: token in and token out across turns, environment
tokens masked out of every loss, advantage and check, episodes ended by the environment, max_turns or budget."""
import dataclasses

import pytest
import torch

from rlhf_ray import algo
from rlhf_ray.config import load_config
from rlhf_ray.data.prompts import Prompt
from rlhf_ray.envs.base import EnvError
from rlhf_ray.envs.episode import EpisodeRunner, turn_seed
from rlhf_ray.rl.controller import RLController, StepConfig
from rlhf_ray.rl.prompt_stream import PromptStream
from rlhf_ray.roles.losses import policy_minibatch_loss
from rlhf_ray.sync.checks import LogprobMismatchError, check_logprob_agreement, logprob_agreement

import envs_for_tests as user
from fakes import EnvRoles, ScriptedEngine, token_logprob

OBS = [90, 91, 92]          # what every observation encodes to in the pure tests


def runner(env_cls, *, max_turns=3, budget=64, max_obs=8, encode=lambda text: list(OBS), decode=str, tools=None):
    return EpisodeRunner(lambda: env_cls(tools or {}), encode, decode, max_turns=max_turns, budget=budget,
                         template="{text}", max_observation_tokens=max_obs, name="test-env")


def test_sampled_ids_are_kept_and_environment_ids_follow_them_masked():
    engine = ScriptedEngine([[11, 12], [21, 22, 23], [31]])
    eps = runner(user.TwoToolTurns).run(engine, [[1, 2], [1, 3, 4]], [{}, {}], n=2, seed=5)
    r = eps.rollout
    assert len(r) == 4 and r.prompt_index == [0, 0, 1, 1]
    for b in range(4):
        assert r.response_ids[b] == [11, 12] + OBS + [21, 22, 23] + OBS + [31]
        assert r.policy_mask[b] == [1, 1, 0, 0, 0, 1, 1, 1, 0, 0, 0, 1]
    # token in: each turn the engine was given the prompt ids and every id of the episode so far, never text
    contexts = [calls[0] for calls in engine.calls]
    assert contexts[0][2] == [1, 3, 4]
    assert contexts[1][2] == [1, 3, 4, 11, 12] + OBS
    assert contexts[2][2] == [1, 3, 4, 11, 12] + OBS + [21, 22, 23] + OBS
    assert [c[2] for c in engine.calls] == [turn_seed(5, t) for t in range(3)]
    # each sampled log-prob sits on its own token; the environment's are 0.0 placeholders
    ctx = len(contexts[2][2])
    assert r.response_logprobs[2][-1] == token_logprob(ctx, 31)
    assert r.response_logprobs[2][2:5] == [0.0, 0.0, 0.0]
    assert r.response_logprobs[2][:2] == [token_logprob(3, 11), token_logprob(4, 12)]
    # the environment's reward: len("31") of the third turn's text; the episode's statistics
    assert eps.rewards == [2.0] * 4
    s = eps.stats[0]
    assert (s.turns, s.tool_calls, s.tool_errors, s.policy_tokens, s.env_tokens, s.done) == (3, 2, 0, 6, 6, True)
    m = eps.metrics()
    assert m["episode/turns"] == 3 and m["episode/env_token_frac"] == 0.5 and m["episode/done_frac"] == 1.0


def test_an_episode_ends_at_max_turns_and_within_its_token_budget():
    engine = ScriptedEngine([[5, 6, 7, 8]])
    eps = runner(user.AlwaysTool, max_turns=2).run(engine, [[1]], [{}], n=1, seed=0)
    # no reply after the last turn: nothing trails the policy's last token
    assert eps.rollout.response_ids[0] == [5, 6, 7, 8] + OBS + [5, 6, 7, 8]
    assert eps.stats[0].done is False and eps.stats[0].tool_errors == 2
    # budget 10: turn 1 takes 4, the reply 3, turn 2 may sample only the 3 left (its limit says so)
    engine = ScriptedEngine([[5, 6, 7, 8]])
    eps = runner(user.AlwaysTool, max_turns=5, budget=10).run(engine, [[1]], [{}], n=1, seed=0)
    assert [c[1] for c in engine.calls] == [[10], [3]]
    assert eps.rollout.response_ids[0] == [5, 6, 7, 8] + OBS + [5, 6, 7]
    assert len(eps.rollout.response_ids[0]) <= 10
    # a turn cap: each turn samples at most max_turn_tokens
    engine = ScriptedEngine([[5, 6, 7, 8]])
    run = EpisodeRunner(lambda: user.AlwaysTool({}), lambda t: list(OBS), str, max_turns=2, budget=64, template="{text}",
                        max_observation_tokens=8, max_turn_tokens=3)
    eps = run.run(engine, [[1]], [{}], n=1, seed=0)
    assert [c[1] for c in engine.calls] == [[3], [3]] and eps.rollout.response_ids[0] == [5, 6, 7] + OBS + [5, 6, 7]
    # a reply that leaves no room for another sampled token ends the episode before it is appended
    engine = ScriptedEngine([[5, 6, 7, 8, 9, 10, 11]])
    eps = runner(user.AlwaysTool, max_turns=5, budget=10).run(engine, [[1]], [{}], n=1, seed=0)
    assert eps.rollout.response_ids[0] == [5, 6, 7, 8, 9, 10, 11] and len(engine.calls) == 1


def test_a_long_observation_is_cut_and_a_finished_episode_leaves_the_batch():
    engine = ScriptedEngine([[5], [6], [7]])
    eps = runner(user.AlwaysTool, max_obs=2, encode=lambda t: list(range(100, 120))).run(engine, [[1]], [{}], 1, 0)
    assert eps.rollout.response_ids[0] == [5, 100, 101, 6, 100, 101, 7]
    # the third turn goes to live episodes only
    engine = ScriptedEngine([[5], [6], [7]])
    runner(user.TwoToolTurns).run(engine, [[1], [2]], [{}, {}], 1, 0)
    assert [len(c[0]) for c in engine.calls] == [2, 2, 2]


def test_a_reply_that_is_not_a_reply_is_one_line_naming_the_environment():
    with pytest.raises(EnvError, match=r"environment test-env: step\(\) returned dict, not rlhf_ray.envs.base.Reply"):
        runner(user.ReturnsADict).run(ScriptedEngine([[5]]), [[1]], [{}], 1, 0)


# -- through the controller ----------------------------------------------------------------------
def make_controller(engine, runner_, *overrides, prompts=((1, 2), (1, 3))):
    cfg = load_config(None, ["rl.prompts_per_step=2", "rollout.n_samples_per_prompt=2", "algorithm.mini_batch_size=4",
                             "env.path=builtin:arith", "rollout.max_turns=3", "reward.sources=[]",
                             "reference.kl_coef=0", *overrides])
    stream = PromptStream([Prompt(f"p{i}", tuple(p), {"prompt": f"p{i}"}) for i, p in enumerate(prompts)], 2, seed=0)
    roles = EnvRoles(engine)
    return RLController(StepConfig.of(cfg), roles, stream, pad_id=0, episodes=runner_), roles


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from rlhf_ray.models.kit import resolve_model_path
    t = AutoTokenizer.from_pretrained(resolve_model_path("builtin:tiny"))
    # a chat template that trims what the assistant wrote, as many do: rendering the conversation again moves
    # tokens the policy sampled
    t.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] | trim }}</s>\n{% endfor %}"
                       "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
    return t


def spelled_out(tok, text: str) -> list[int]:
    """`text` sampled one byte-level character at a time: the same text, not the ids the tokenizer would make."""
    pieces = [ch for t in tok.convert_ids_to_tokens(tok(text, add_special_tokens=False)["input_ids"]) for ch in t]
    return tok.convert_tokens_to_ids(pieces)


def test_trained_ids_are_the_sampled_ids_across_turns_where_the_chat_template_would_retokenize_them(tok):
    turn1 = spelled_out(tok, " great film ") + [tok.eos_token_id]
    turn2 = spelled_out(tok, "a fine movie") + [tok.eos_token_id]
    assert tok(" great film ", add_special_tokens=False)["input_ids"] != turn1[:-1]  # the engine's own spelling
    template = "\n<s>user\n{text}</s>\n<s>assistant\n"
    run = EpisodeRunner(lambda: user.TwoToolTurns({}), lambda t: tok(t, add_special_tokens=False)["input_ids"],
                        lambda ids: tok.decode(ids, skip_special_tokens=False), max_turns=2, budget=120,
                        template=template, max_observation_tokens=32, name="t")
    engine = ScriptedEngine([turn1, turn2], decode=lambda ids: tok.decode(ids, skip_special_tokens=True))
    messages = [{"role": "user", "content": "Review:"}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    c, roles = make_controller(engine, run, "rollout.max_new_tokens=120", "rollout.max_turns=2",
                               prompts=(prompt, prompt))
    c.step()
    batch = roles.updates[0]
    obs = tok(template.format(text="obs -"), add_special_tokens=False)["input_ids"]
    P, seq = batch.seq.prompt_len, batch.seq
    for b in range(len(seq)):
        real = seq.attention_mask[b].bool()
        trained = seq.input_ids[b][real].tolist()
        assert trained == list(prompt) + turn1 + obs + turn2
        # the trained log-probs are the sampled ones, token by token; the environment's are masked
        mask = seq.response_mask[b][:len(turn1 + obs + turn2)].tolist()
        assert mask == [1.0] * len(turn1) + [0.0] * len(obs) + [1.0] * len(turn2)
        assert batch.old_logp[b, len(turn1) + len(obs)].item() == pytest.approx(
            token_logprob(len(prompt) + len(turn1) + len(obs), turn2[0]))
    # what re-rendering the conversation would have trained on instead: other ids
    convo = messages + [{"role": "assistant", "content": tok.decode(turn1, skip_special_tokens=True)},
                        {"role": "user", "content": "obs -"},
                        {"role": "assistant", "content": tok.decode(turn2, skip_special_tokens=True)}]
    rendered = tok.apply_chat_template(convo, tokenize=True, return_dict=False)
    assert rendered[:len(prompt)] == list(prompt) and rendered[len(prompt):] != turn1 + obs + turn2
    assert P == len(prompt)


def test_environment_tokens_carry_no_loss_gradient_and_no_logprob_check():
    engine = ScriptedEngine([[11, 12], [21, 22, 23], lambda k: [31] if k % 2 else [131]])  # rewards 2 and 3
    c, roles = make_controller(engine, runner(user.TwoToolTurns))
    out = c.step()
    batch = roles.updates[0]
    mask = batch.seq.response_mask
    env = torch.zeros_like(mask)
    env[:, 2:5] = 1
    env[:, 8:11] = 1
    assert (mask * env).sum() == 0 and mask.sum() == 4 * 6
    assert (batch.advantages * env).abs().sum() == 0            # no advantage on an environment token
    # the policy's loss has no gradient on an environment token's logits
    V = 256
    logits = torch.randn(*mask.shape, V, requires_grad=True)
    logp = algo.token_logprobs(logits, batch.seq.response_ids, 1.0)
    cfg = c.cfg
    on_policy = dataclasses.replace(batch, old_logp=logp.detach())  # ratio 1: nothing clipped away
    loss, _ = policy_minibatch_loss(logits, logp, on_policy, cfg.algorithm, cfg.reference, 0.0, 1.0, 64)
    loss.backward()
    per_token = logits.grad.abs().sum(-1)
    assert per_token[env.bool()].max() == 0 and per_token[mask.bool()].min() > 0
    # a learner that finds the environment's tokens unlikely (they were not sampled) still agrees exactly
    learner = torch.where(env.bool(), torch.full_like(mask, -9.0), batch.old_logp)
    check_logprob_agreement(logprob_agreement(learner, batch.old_logp, mask), c.agreement, version=0)
    # ...which a batch that counted them would not
    counted = batch.seq.attention_mask[:, batch.seq.prompt_len:].float()
    with pytest.raises(LogprobMismatchError):
        check_logprob_agreement(logprob_agreement(learner, batch.old_logp, counted), c.agreement, version=0)
    # the step's metrics per episode, and the rows that samples.jsonl keeps whole
    assert out.metrics["episode/turns"] == 3 and out.metrics["episode/env_tokens"] == 6
    assert out.metrics["reward/env_mean"] == 2.5 and out.episodes[0]["tool_calls"] == 2
    assert out.scores == [3.0, 2.0, 3.0, 2.0]
    assert out.responses[1] == str([11, 12] + OBS + [21, 22, 23] + OBS + [31])


def test_gae_runs_over_the_policy_tokens_of_an_episode_and_skips_the_environments():
    mask = torch.tensor([[1., 1., 0., 0., 1., 1., 0.], [1., 0., 1., 0., 0., 0., 0.]])
    rewards = torch.tensor([[0.1, 0.0, 9.0, 9.0, 0.0, 1.0, 0.0], [0.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0]]) * mask
    values = torch.tensor([[0.5, 0.4, 7.0, 7.0, 0.3, 0.2, 0.0], [0.1, 5.0, 0.2, 0.0, 0.0, 0.0, 0.0]])
    adv, ret = algo.compute_advantages("gae", rewards, mask, values=values, gamma=0.9, lam=0.8)
    # the same as GAE on the policy tokens alone, put back in their places
    packed_mask = torch.tensor([[1., 1., 1., 1.], [1., 1., 0., 0.]])
    p_adv, p_ret = algo.gae(torch.tensor([[0.1, 0.0, 0.0, 1.0], [0.0, 2.0, 0.0, 0.0]]), packed_mask,
                            values=torch.tensor([[0.5, 0.4, 0.3, 0.2], [0.1, 0.2, 0.0, 0.0]]), gamma=0.9, lam=0.8)
    torch.testing.assert_close(adv[0, [0, 1, 4, 5]], p_adv[0], rtol=0, atol=0)
    torch.testing.assert_close(adv[1, [0, 2]], p_adv[1, :2], rtol=0, atol=0)
    torch.testing.assert_close(ret[0, [0, 1, 4, 5]], p_ret[0], rtol=0, atol=0)
    assert adv[0, [2, 3, 6]].abs().sum() == 0 and adv[1, [1, 3]].abs().sum() == 0
    # the last token of turn 1 bootstraps from the value at turn 2's first token (not the environment's 7.0)
    assert adv[0, 1].item() == pytest.approx(p_adv[0, 1].item())
    # a sequence-level estimator: one advantage on every policy token of the episode
    g_adv, _ = algo.compute_advantages("grpo", rewards, mask, group_size=2)
    assert set(g_adv[0][mask[0].bool()].tolist()) == {g_adv[0, 0].item()} and g_adv[0, 2] == 0


def test_a_resumed_controller_runs_the_same_episodes_after_the_checkpoint():
    def fresh():
        engine = ScriptedEngine([[11, 12], [21, 22, 23], lambda k: [31] if k % 2 else [131]])
        return (*make_controller(engine, runner(user.TwoToolTurns), prompts=((1, 2), (1, 3), (1, 4))), engine)

    a, _, engine_a = fresh()
    a.step()
    state = a.state_dict()
    calls_before = len(engine_a.calls)
    out_a = a.step()
    b, _, engine_b = fresh()          # a new driver: the checkpoint's state, then the next step
    b.load_state_dict(state)
    out_b = b.step()
    assert engine_b.calls == engine_a.calls[calls_before:]   # the same contexts, limits and per-turn seeds
    assert out_b.prompts == out_a.prompts and out_b.responses == out_a.responses and out_b.scores == out_a.scores
