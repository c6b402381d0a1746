"""builtin:arith's SFT demonstrations (the warm start of configs/cpu/tools-arith.yaml): each one is an episode the
environment itself accepts, and none is a problem the RL run trains or is evaluated on."""
from pathlib import Path

import pytest

from rlhf_ray.config import load_config
from rlhf_ray.data.sources import load_rows
from rlhf_ray.envs import arith
from rlhf_ray.envs.base import Reply
from rlhf_ray.envs.tools import Calculator
from rlhf_ray.rl.evaluation import split_prompts

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "cpu" / "tools-arith.yaml"


def _question(messages: list[dict]) -> str:
    return messages[0]["content"]


def test_each_demonstration_is_an_episode_the_environment_scores_exact():
    rows = arith.demo_rows(200, seed=0)
    assert rows == arith.demo_rows(200, seed=0) and rows != arith.demo_rows(200, seed=1)
    calls, answers = rows[0::2], rows[1::2]
    for call, answer in zip(calls, answers):
        question, turn = _question(call["messages"]), call["messages"][-1]["content"]
        assert answer["messages"][:2] == call["messages"] and turn.startswith("<calc>")
        row = {"answer": answer["messages"][-1]["content"]}
        env = arith.ArithEnv({"calculator": Calculator()})
        env.reset(row)
        reply = env.step(turn)  # the call evaluates, through the environment's own calculator, to the answer
        assert reply == Reply("tool", f"<result>{row['answer']}</result>", tool_calls=1), question
        assert answer["messages"][2] == {"role": "user", "content": reply.text}
        assert env.step(answer["messages"][-1]["content"]) == Reply("done", reward=1.0)


def test_no_demonstration_is_a_held_out_or_training_prompt_of_the_shipped_run():
    cfg = load_config(str(CONFIG), [])
    assert "sft" in cfg.run.stages and cfg.data.sft == cfg.data.prompts == "builtin:arith"
    for seed in (cfg.run.seed, cfg.run.seed + 1):
        prompts, _ = load_rows(cfg.data.prompts, "prompts", cfg.data, seed)
        demos, _ = load_rows(cfg.data.sft, "sft", cfg.data, seed)
        train, held_out = split_prompts([r["prompt"] for r in prompts], cfg)
        assert len(held_out) == cfg.data.rl_eval_prompts and len(demos) == cfg.data.num_samples
        shown = {_question(d["prompt"]) for d in demos}
        assert not shown & set(held_out) and not shown & set(train)


def test_demonstrations_and_prompts_come_from_disjoint_shares_of_the_problems():
    assert not any(arith.is_demo(r["prompt"].split("\n\n")[-1]) for r in arith.prompt_rows(2000, seed=5))
    assert all(arith.is_demo(_question(r["messages"]).split("\n\n")[-1]) for r in arith.demo_rows(200, seed=5))


def test_arith_as_preference_pairs_is_one_line_naming_what_it_holds():
    from rlhf_ray.data.readers import DataError
    cfg = load_config(str(CONFIG), [])
    with pytest.raises(DataError, match="builtin:arith holds RL prompts and SFT demonstrations, not preference pairs"):
        load_rows("builtin:arith", "preferences", cfg.data, 0)


@pytest.mark.slow
def test_an_answer_demonstration_is_tokenized_as_the_rl_episode_feeds_it_to_the_engine():
    """SmolLM2's chat template renders the call row's turn ending on EOS, then the calculator's reply as the
    shipped `env.observation_template`: the SFT prompt of the answer is the RL engine's context, id for id."""
    from transformers import AutoTokenizer

    from rlhf_ray.data.encode import Limits, encode_sft
    from rlhf_ray.data.readers import normalize
    from rlhf_ray.models.kit import resolve_model_path
    cfg = load_config(str(CONFIG), [])
    tok = AutoTokenizer.from_pretrained(resolve_model_path(cfg.model.path))
    rows = [normalize(r, "sft") for r in arith.demo_rows(40, seed=0)]
    examples, counts = encode_sft(rows, tok, Limits(cfg.data.max_prompt_len, cfg.data.max_seq_len, "error"))
    assert not counts  # nothing truncated or skipped at the shipped limits
    for call, answer, row in zip(examples[0::2], examples[1::2], rows[1::2]):
        turn_end = call["input_ids"].index(tok.eos_token_id, call["loss_mask"].index(1)) + 1  # the engine stops here
        reply = cfg.env.observation_template.format(text=row["prompt"][2]["content"])
        context = call["input_ids"][:turn_end] + tok(reply, add_special_tokens=False)["input_ids"]
        assert answer["input_ids"][:answer["loss_mask"].index(1)] == context
