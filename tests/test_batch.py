import torch

from rlhf_ray.batch import minibatches, pack_sequences, pad_ragged, response_logits


def test_pack_left_pads_prompts_and_right_pads_responses():
    b = pack_sequences([[5, 6], [7]], [[1, 2, 3], [4]], pad_id=0)
    assert b.prompt_len == 2
    assert b.input_ids.tolist() == [[5, 6, 1, 2, 3], [0, 7, 4, 0, 0]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1, 1], [0, 1, 1, 0, 0]]
    assert b.position_ids.tolist() == [[0, 1, 2, 3, 4], [0, 0, 1, 1, 1]]
    assert b.response_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b.response_ids.tolist() == [[1, 2, 3], [4, 0, 0]]


def test_response_logits_align_with_response_tokens():
    b = pack_sequences([[5, 6], [7]], [[1, 2, 3], [4]], pad_id=0)
    # logits[:, j] "predicts" input_ids[:, j + 1]: encode that as a one-hot of the next token
    L = b.input_ids.shape[1]
    logits = torch.zeros(2, L, 10)
    for j in range(L - 1):
        logits[torch.arange(2), j, b.input_ids[:, j + 1]] = 1.0
    picked = response_logits(logits, b).argmax(-1)
    assert torch.equal(picked * b.response_mask.long(), b.response_ids * b.response_mask.long())


def test_pad_ragged_and_errors():
    t = pad_ragged([[0.5, -1.0], [2.0]], 3)
    assert t.tolist() == [[0.5, -1.0, 0.0], [2.0, 0.0, 0.0]]
    try:
        pad_ragged([[1, 2, 3, 4]], 3)
        raise AssertionError("expected ValueError")
    except ValueError as e:
        assert "more than the batch width" in str(e)


def test_minibatches_partition_all_rows():
    g = torch.Generator().manual_seed(0)
    mbs = minibatches(12, 4, g)
    assert len(mbs) == 3 and sorted(torch.cat(mbs).tolist()) == list(range(12))


def test_empty_response_still_has_one_column():
    b = pack_sequences([[5]], [[]], pad_id=0)
    assert b.response_mask.shape == (1, 1) and b.response_mask.sum() == 0


def test_minibatches_keep_groups_whole():
    g = torch.Generator().manual_seed(0)
    mbs = minibatches(12, 6, g, group=3)
    assert sorted(torch.cat(mbs).tolist()) == list(range(12))
    for mb in mbs:  # each minibatch holds whole groups: rows 3k, 3k+1, 3k+2 together
        groups = sorted(set((mb // 3).tolist()))
        assert sorted(mb.tolist()) == [3 * k + j for k in groups for j in range(3)]
    # rows shuffled at the group level still differ from epoch to epoch
    assert not torch.equal(torch.cat(minibatches(12, 6, g, group=3)), torch.cat(mbs))
    # a size that splits groups falls back to shuffling rows
    assert len(minibatches(12, 4, g, group=3)) == 3


def test_joined_batches_are_the_batch_of_all_their_rows():
    """DAPO joins rounds of different widths: re-padded left (prompts) and right (responses), the result is what
    packing every row at once gives, positions included."""
    from rlhf_ray.batch import concat_sequences, pad_right
    prompts, responses = [[5, 6], [7], [8, 9, 10]], [[1], [2, 3, 4], []]
    parts = [pack_sequences(prompts[:2], responses[:2], 0), pack_sequences(prompts[2:], responses[2:], 0)]
    whole, joined = pack_sequences(prompts, responses, 0), concat_sequences(parts, 0)
    for field in ("input_ids", "attention_mask", "position_ids", "response_mask"):
        assert torch.equal(getattr(joined, field), getattr(whole, field)), field
    assert joined.prompt_len == whole.prompt_len == 3
    assert pad_right([torch.ones(1, 1), torch.ones(2, 3)], 3).tolist() == [[1, 0, 0], [1, 1, 1], [1, 1, 1]]
