"""Scoring split over the cores (`rlhf_ray.utils.phases.CoreTeam`, the plan's `PhaseShares.score_rows`): each
scoring micro-batch's rows are cut into pieces computed at once on the team's threads, and every scorer returns
what one pass over the micro-batch returns."""
import threading

import pytest
import torch

from rlhf_ray.batch import pack_sequences
from rlhf_ray.config import RewardConfig, RewardSource
from rlhf_ray.dispatch import balanced_cut, cut_rows, dealt
from rlhf_ray.models import packed
from rlhf_ray.models.kit import resolve_model_path
from rlhf_ray.placement.construct import Share
from rlhf_ray.roles.reference import ReferenceScorer
from rlhf_ray.roles.reward import RewardScorer
from rlhf_ray.utils import phases
from rlhf_ray.utils.phases import CoreTeam

TWO = (Share(1, (0, 1)), Share(1, (1, 2)))


def test_a_team_runs_the_parts_at_once_on_its_own_threads_in_the_callers_grad_mode():
    team = CoreTeam(TWO)
    both_in = threading.Barrier(2, timeout=10)  # each of two parts waits for the other: they run at once

    def part(x):
        both_in.wait()
        return x, threading.current_thread().name, torch.get_num_threads(), torch.is_grad_enabled()
    try:
        with torch.no_grad():
            out = team.map(part, [0, 1])
        assert [o[0] for o in out] == [0, 1]                      # in part order
        assert {o[1] for o in out} == {t.name for t in team._pool._threads} and len({o[1] for o in out}) == 2
        assert threading.current_thread().name not in {o[1] for o in out}
        assert [o[2:] for o in out] == [(1, False), (1, False)]   # one-thread teams, the caller's no_grad
        assert [r[3] for r in team.map(part, [0, 1])] == [True, True]                  # and its grad mode
        # more parts than threads: all of them, in order
        assert team.map(lambda x: x * x, list(range(7))) == [x * x for x in range(7)]

        def fails(x):
            if x == 0:
                raise ValueError("part 0")
            return x
        with pytest.raises(ValueError, match="part 0"):
            team.map(fails, [0, 1])
    finally:
        team.close()
    # no shares (a GPU, one core): the caller's own thread
    assert CoreTeam().map(lambda x: threading.current_thread().name, [0, 1]) == [threading.current_thread().name] * 2


@pytest.mark.skipif(len(phases._ALL_CORES) < 2, reason="needs 2 cores to pin two disjoint slices")
def test_each_team_thread_keeps_to_its_own_core():
    import os
    team = CoreTeam(TWO)
    gate = threading.Barrier(2, timeout=10)
    try:
        masks = team.map(lambda _: (gate.wait(), sorted(os.sched_getaffinity(0)))[1], [0, 1])
    finally:
        team.close()
    assert sorted(masks) == [[c] for c in phases._ALL_CORES[:2]]


def test_balanced_cut_keeps_long_rows_together_and_short_ones_together():
    # six rows, longest first: two long ones alone cost 2 x 10, the four short ones 4 x 2; halves in order 3 x 10
    sizes = [(1, 0, 10), (1, 0, 9), (1, 0, 2), (1, 0, 2), (1, 0, 1), (1, 0, 1)]
    assert balanced_cut(sizes, 2) == [[0, 1], [2, 3, 4, 5]]
    assert balanced_cut(sizes, 1) == [list(range(6))]
    # room for more pieces than it needs: none larger than the longest row alone, no more pieces than that takes
    assert balanced_cut(sizes, 6) == [[0], [1], [2, 3, 4, 5]]
    assert balanced_cut([(3, 4, 2)], 2) == [[0]] and balanced_cut([], 2) == []


def test_cut_rows_cuts_whole_prompt_runs_by_padded_size():
    prompts = [[11, 12], [21], [31, 32, 33], [41]]
    lengths = [1, 2, 8, 7, 1, 1, 2, 2]             # rows 2-3 (prompt 31..33) are the long ones
    seq = pack_sequences([p for p in prompts for _ in range(2)], [[5] * n for n in lengths], pad_id=0)
    pieces = cut_rows(torch.arange(8), 2, seq)
    assert [sorted(c.tolist()) for c in pieces] == [[2, 3], [0, 1, 4, 5, 6, 7]]
    assert sorted(torch.cat(pieces).tolist()) == list(range(8))
    # fewer runs than pieces: the rows one by one
    assert sorted(len(c) for c in cut_rows(torch.arange(2), 2, seq)) == [1, 1]
    assert [c.tolist() for c in cut_rows(torch.arange(1), 4, seq)] == [[0]]


def test_dealt_gives_each_piece_long_and_short_items_in_turn():
    assert dealt(5, 2) == [[0, 3, 4], [1, 2]] and dealt(6, 3) == [[0, 5], [1, 4], [2, 3]]
    assert dealt(1, 4) == [[0]] and dealt(0, 2) == [] and dealt(3, 1) == [[0, 1, 2]]


def test_cut_rows_deals_whole_prompt_runs_when_the_forward_packs_so_each_piece_packs():
    prompts = [[11, 12], [21], [31, 32, 33], [41]]
    lengths = [1, 2, 8, 7, 1, 1, 2, 2]             # runs longest first (prompt + response): rows 2-3, 0-1, 4-5, 6-7
    seq = pack_sequences([p for p in prompts for _ in range(2)], [[5] * n for n in lengths], pad_id=0)
    assert [c.tolist() for c in cut_rows(torch.arange(8), 2, seq, packed=True)] == [[2, 3, 6, 7], [0, 1, 4, 5]]
    # ragged rows (many short responses, a few long): a piece of long rows alone leaves little to pack; dealt,
    # the pieces pack as tightly as the whole batch does
    g = torch.Generator().manual_seed(0)
    lengths = (-torch.rand(32, generator=g).log() * 12).clamp(1, 32).long().tolist()
    seq = pack_sequences([[7] * (4 + i % 8) for i in range(32)], [[5] * n for n in lengths], pad_id=0)

    def positions(pieces):  # what the pieces' forwards compute, each packed where that saves positions
        out = 0
        for piece in pieces:
            mb = seq.select(piece).trimmed()
            rows = packed.pack_rows(mb)
            out += (rows.input_ids if rows is not None else mb.input_ids).numel()
        return out
    by_size, by_turn = cut_rows(torch.arange(32), 2, seq), cut_rows(torch.arange(32), 2, seq, packed=True)
    assert sorted(torch.cat(by_turn).tolist()) == list(range(32))
    whole = positions([torch.arange(32)])                      # 640 of the padded 1376
    assert positions(by_turn) <= 1.05 * whole < positions(by_size), (whole, positions(by_turn), positions(by_size))


def ragged(pad_id: int, prompts: list[list[int]], samples: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    rows = [p for p in prompts for _ in range(samples)]
    lengths = torch.randint(1, 9, (len(rows),), generator=g).tolist()
    return pack_sequences(rows, [torch.randint(3, 200, (k,), generator=g).tolist() for k in lengths], pad_id)


@pytest.mark.parametrize("samples", [1, 3], ids=["ppo-rows", "grpo-groups"])
def test_reference_log_probs_over_a_team_are_the_one_pass_log_probs(samples):
    ref = ReferenceScorer(resolve_model_path("builtin:tiny"), micro_batch_size=5)  # 3 micro-batches of 12 rows
    prompts = [[11, 12, 13, 14, 15, 16], [21, 22, 23], [31, 32], [41, 42, 43, 44]]
    seq = ragged(ref.model.config.pad_token_id or 0, prompts * (3 if samples == 1 else 1), samples)
    names: list[str] = []
    handle = ref.model.get_input_embeddings().register_forward_hook(
        lambda *_: names.append(threading.current_thread().name))
    team = CoreTeam(TWO)
    try:
        one = ref.logprobs(seq)
        names.clear()
        split = ref.logprobs(seq, team)
    finally:
        handle.remove()
        team.close()
    assert names and all(n.startswith("core-team") for n in names)
    mask = seq.response_mask.bool()
    assert (split - one)[mask].abs().max() < 1e-5 and (split[~mask] == 0).all()


def test_reward_model_scores_over_a_team_are_the_one_pass_scores():
    cfg = RewardConfig(sources=(RewardSource(kind="model", path="builtin:tiny-rm"),))
    scorer = RewardScorer(cfg, resolve_path=resolve_model_path, batch_size=3)
    prompts = [f"review of film {i} :" for i in range(7)]
    responses = [" good" * (1 + i % 4) for i in range(7)]
    team = CoreTeam(TWO)
    try:
        split, _ = scorer.score(prompts, responses, team)
    finally:
        team.close()
    one, _ = scorer.score(prompts, responses)
    assert split == pytest.approx(one, abs=1e-5) and len(set(round(s, 4) for s in one)) > 1


def test_a_reward_model_reads_rows_packed_without_their_padding_as_it_reads_them_padded(monkeypatch):
    cfg = RewardConfig(sources=(RewardSource(kind="model", path="builtin:tiny-rm"),))
    scorer = RewardScorer(cfg, resolve_path=resolve_model_path, batch_size=16)
    model = scorer.sources[0][0]
    assert model.pack_dtype is not None                             # a decoder model with SDPA: it packs
    prompts = [f"review of film {i} :" for i in range(12)]
    responses = [" good" * (1 + 5 * (i % 4)) + " bad" * (i % 3) for i in range(12)]  # 1 to 18 words
    used = []
    pack_rows = packed.pack_rows
    monkeypatch.setattr(packed, "pack_rows", lambda seq: used.append(pack_rows(seq)) or used[-1])
    team = CoreTeam(TWO)
    try:
        packed_scores, _ = scorer.score(prompts, responses)
        packed_split, _ = scorer.score(prompts, responses, team)
    finally:
        team.close()
    assert used and all(rows is not None for rows in used)      # every forward above ran packed
    model.pack_dtype = None
    padded, _ = scorer.score(prompts, responses)
    assert packed_scores == pytest.approx(padded, abs=1e-5) and packed_split == pytest.approx(padded, abs=1e-5)
    assert len(set(round(s, 4) for s in padded)) > 1


@pytest.mark.slow
def test_learner_scoring_over_a_team_the_lora_reference_with_its_adapter_off_and_the_critics_values():
    """The policy's reference under LoRA is its adapter switched off: held by the caller around the team's
    pieces, so every piece computes the base model's log-probs; the critic's values likewise match one pass."""
    from rlhf_ray.config.schema import AlgorithmConfig, ReferenceConfig
    from rlhf_ray.roles.critic import CriticWorker
    from rlhf_ray.roles.policy import PolicyWorker
    from tests.learner.helpers import make_learner
    policy, critic = make_learner(lora=True), make_learner(kind="value")
    with torch.no_grad():  # an adapter that moves the log-probs (LoRA's B starts at zero)
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    seq = ragged(policy.tokenizer.pad_token_id, [[11, 12, 13], [21, 22], [31, 32, 33, 34]], 2)
    worker = PolicyWorker(policy, AlgorithmConfig(), ReferenceConfig(), temperature=1.0, norm_len=8)
    values = CriticWorker(critic, AlgorithmConfig(), norm_len=8)
    team = CoreTeam(TWO)
    try:
        ref_split, values_split = worker.ref_logprobs(seq, team), values.values(seq, team)
    finally:
        team.close()
    mask = seq.response_mask.bool()
    ref_one, tuned = worker.ref_logprobs(seq), worker.logprobs(seq)
    assert (ref_split - ref_one)[mask].abs().max() < 1e-5
    assert (tuned - ref_one)[mask].abs().max() > 1e-3  # the adapter matters: the pieces ran without it
    assert (values_split - values.values(seq))[mask].abs().max() < 1e-5
