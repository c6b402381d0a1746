"""rollout.mode=async: the producer thread, its lag bound, partial rollouts and exactly-once resume, with in-process
fake roles driven by the product's controller and WeightSync (no Ray, no models)."""
import threading
import time

import pytest
import torch

from rlhf_ray.config import load_config
from rlhf_ray.data.prompts import Prompt
from rlhf_ray.records import Rollout, UpdateResult
from rlhf_ray.rl.controller import RLController, StepConfig, generation_seed
from rlhf_ray.rl.producer import sample_in_chunks, staleness_metrics
from rlhf_ray.rl.prompt_stream import PromptStream
from rlhf_ray.sync.checks import Agreement
from rlhf_ray.sync.weight_sync import SyncStats, WeightSync

LENGTH = 5  # every fake response is 5 tokens long (EOS at the 5th)


def logp_of(version: int) -> float:
    """The fake engine samples every token at a log-prob that names the version that sampled it."""
    return -1.0 - 0.01 * version


class FakeEngines:
    """Engines and learner in one object, safe to call from the producer's thread and the controller's.

    An engine call samples up to its limit of 7s per sequence, continuing a sequence whose prompt already holds
    some (prompt ids are (1, 2 + K); whatever follows them was sampled before). `engine` is the engines' one
    queue: a call and a push run one at a time, as on a colocated rank's engine thread or an engine actor.

    scripted (partial rollouts at lag 1, deterministic): update k waits until batch k + 1 has sampled its first
    chunk, and a continuation of batch b waits until push b has landed, so batch b >= 1 samples its first chunk
    at version b - 1 and the rest at version b. stale_batch: that batch's first chunk reports version 0 (an
    engine left behind)."""

    def __init__(self, update_s=0.0, scripted=False, stale_batch=None, steps=None):
        self.optimizer_steps, self.gen_version = 0, 0
        self.update_s, self.scripted, self.stale_batch, self.steps = update_s, scripted, stale_batch, steps
        self.engine = threading.Lock()
        self.cond = threading.Condition()
        self.first_chunks, self.pushes = 0, 0
        self.seeds, self.trained_old_logp = [], []
        self.weights = WeightSync(self, lambda: self.optimizer_steps)

    def submit(self, prompt_ids, n, seed, max_new_tokens=None):
        """The call runs when its result is asked for (the producer asks at once), outside the submission lock."""
        first = n > 1 or all(len(p) == 2 for p in prompt_ids)
        if first:
            self.seeds.append(seed)
        return type("Pending", (), {"result": lambda _self: self._run(prompt_ids, n, max_new_tokens, first)})()

    def _run(self, prompt_ids, n, max_new_tokens, first):
        batch = self.first_chunks if first else self.first_chunks - 1  # the producer samples one batch at a time
        if self.scripted and not first:
            with self.cond:
                assert self.cond.wait_for(lambda: self.pushes >= batch, timeout=10), "no push came"
        with self.engine:
            version = 0 if first and batch == self.stale_batch else self.gen_version
            resp, idx, prompts = [], [], []
            for i, p in enumerate(prompt_ids):
                limit = max_new_tokens[i] if max_new_tokens else LENGTH
                for _ in range(n):
                    resp.append([7] * min(limit, LENGTH - (len(p) - 2)))
                    idx.append(i)
                    prompts.append(list(p))
        if first:
            with self.cond:
                self.first_chunks += 1
                self.cond.notify_all()
        done = ["stop" if len(p) - 2 + len(r) == LENGTH else "length" for p, r in zip(prompts, resp)]
        return Rollout(prompts, resp, [[logp_of(version)] * len(r) for r in resp], [" x" * len(r) for r in resp],
                       idx, done, version, 1.0)

    def generate(self, prompt_ids, n, seed, max_new_tokens=None):  # lockstep, for the reference runs
        return self.submit(prompt_ids, n, seed, max_new_tokens).result()

    def score(self, prompts, responses, finished, seq):
        return [float(i % 3) for i in range(len(responses))], torch.full(seq.response_mask.shape, -1.0), None, {}

    def update(self, batch, minibatches, kl_coef, overlapped=False):
        k = self.optimizer_steps // sum(len(e) for e in minibatches)  # updates so far
        if self.scripted and k + 1 < self.steps:
            with self.cond:
                assert self.cond.wait_for(lambda: self.first_chunks >= k + 2, timeout=10), "next batch never started"
        time.sleep(self.update_s)
        self.trained_old_logp.append(batch.old_logp.clone())
        self.optimizer_steps += sum(len(epoch) for epoch in minibatches)
        return UpdateResult({"policy/loss": 0.1}, Agreement(0.0, 0.0, 10), 0.0)

    def push(self, version):  # the transport: waits for the engine call in flight, as the real ones do
        with self.engine:
            self.gen_version = version
        with self.cond:
            self.pushes += 1
            self.cond.notify_all()
        return SyncStats(version, 0.0, 0.0, None)


def make(roles, *overrides, prompts=24, steps=8):
    cfg = load_config(None, ["rl.prompts_per_step=2", "rollout.n_samples_per_prompt=3", "algorithm.mini_batch_size=3",
                             f"rollout.max_new_tokens={LENGTH}", f"rl.steps={steps}", *overrides])
    stream = PromptStream([Prompt(f"p{i}", (1, 2 + i)) for i in range(prompts)], 2, seed=0)
    return RLController(StepConfig.of(cfg), roles, stream, pad_id=0)


def run(c, steps):
    try:
        return [c.step() for _ in range(steps)]
    finally:
        c.close()


ASYNC = ("rollout.mode=async",)


# -- pure pieces -------------------------------------------------------------------------------------------
def test_chunks_continue_each_sequence_and_stamp_every_token_with_its_version():
    calls = []

    def generate(ids, n, seed, limits):  # a push lands after every call: version = calls so far
        version = len(calls)
        calls.append((len(ids), n, seed, list(limits)))
        resp = [[10 + version] * min(lim, 5 - (len(p) - 2)) for p in ids for lim in [limits[ids.index(p)]]
                for _ in range(n)]
        prompts = [list(p) for p in ids for _ in range(n)]
        done = ["stop" if len(p) - 2 + len(r) == 5 else "length" for p, r in zip(prompts, resp)]
        return Rollout(prompts, resp, [[-float(version)] * len(r) for r in resp], [f"<{version}>"] * len(resp),
                       [i for i in range(len(ids)) for _ in range(n)], done, version, 1.0, 0.5)

    r = sample_in_chunks(generate, [(1, 2), (1, 3)], 2, seed=11, budget=5, chunk=2)
    # 2 prompts x 2 samples, then every sequence alone: 2, 2, 1 tokens
    assert [c[:2] for c in calls] == [(2, 2), (4, 1), (4, 1)]
    assert calls[0][3] == [2, 2] and calls[2][3] == [1, 1, 1, 1]
    assert len({c[2] for c in calls}) == 3  # each chunk its own seed
    assert r.response_ids[0] == [10, 10, 11, 11, 12]
    assert r.response_versions == [[0, 0, 1, 1, 2]] * 4
    assert r.response_logprobs[0] == [0.0, 0.0, -1.0, -1.0, -2.0]  # each token's log-prob from its own sampler
    assert r.weight_version == 0 and r.texts[0] == "<0><1><2>" and r.finish_reasons == ["stop"] * 4
    assert r.prompt_ids == [[1, 2], [1, 2], [1, 3], [1, 3]] and r.prompt_index == [0, 0, 1, 1]
    assert r.generate_s == pytest.approx(1.5)


def test_a_partial_rollouts_text_is_its_whole_response_decoded_not_its_chunks_joined():
    """A tokenizer that drops the leading space of what it decodes (SentencePiece's) writes "ab cd" as chunks
    "ab" + "cd": the rollout's text is the whole response decoded, as the engine would have written it."""
    words = {1: " ab", 2: " cd", 3: " ef"}

    def decode(ids):  # drops the first word's leading space, as such a tokenizer does
        return ["".join(words[t] for t in r).lstrip(" ") for r in ids]

    def generate(ids, n, seed, limits):  # one token a call: 1, then 2, then 3
        rows = len(ids) * n
        tok = len(ids[0]) - 1  # prompt (1 token) + tokens so far
        resp = [[tok + 1]] * rows
        return Rollout([list(ids[0])] * rows, resp, [[-1.0]] * rows, decode(resp), [0] * rows,
                       ["length"] * rows, 0, 1.0)

    joined = sample_in_chunks(generate, [(9,)], 1, seed=0, budget=3, chunk=1)
    assert joined.response_ids == [[1, 2, 3]] and joined.texts == ["abcdef"]  # the chunks' texts joined
    whole = sample_in_chunks(generate, [(9,)], 1, seed=0, budget=3, chunk=1, decode=decode)
    assert whole.texts == ["ab cd ef"]


def test_a_sequence_the_engine_cannot_lengthen_ends_instead_of_looping():
    calls = []

    def generate(ids, n, seed, limits):  # the first chunk writes 2 tokens, then the context is full: 0 tokens
        calls.append(len(ids))
        assert len(calls) < 5, "the chunk loop asks again and again for a sequence that cannot grow"
        k = 2 if len(calls) == 1 else 0
        rows = len(ids) * n
        return Rollout([list(ids[0])] * rows, [[7] * k] * rows, [[-1.0] * k] * rows, ["x"] * rows, [0] * rows,
                       ["length"] * rows, 0, 1.0)

    r = sample_in_chunks(generate, [(1, 2)], 2, seed=0, budget=6, chunk=2)
    assert calls == [1, 2] and r.response_ids == [[7, 7], [7, 7]] and r.finish_reasons == ["length"] * 2


def test_staleness_metrics_by_hand():
    r = Rollout([[1], [1]], [[7, 7, 7], [7]], [[0.0] * 3, [0.0]], ["", ""], [0, 0], ["stop"] * 2, 3, 1.0,
                response_versions=[[3, 3, 4], [4]])
    m = staleness_metrics(r, learner_version=5, max_lag=2)
    assert m["async/staleness_mean"] == pytest.approx((2 + 2 + 1 + 1) / 4)
    assert m["async/staleness_max"] == 2
    assert (m["async/tokens_lag0"], m["async/tokens_lag1"], m["async/tokens_lag2"]) == (0, 2, 2)
    assert m["async/rows_across_versions"] == 1


@pytest.mark.parametrize("bad, match", [
    (["rollout.partial=true"], "needs rollout.mode=async"),
    (["rollout.mode=async"], "max_off_policy_lag >= 1"),
    ([*ASYNC, "rollout.sync.max_off_policy_lag=1", "algorithm.dynamic_sampling=true"], "dynamic_sampling"),
    ([*ASYNC, "rollout.sync.max_off_policy_lag=1", "rollout.partial=true", "rollout.stop=[x]"], "rollout.stop"),
    ([*ASYNC, "rollout.sync.max_off_policy_lag=1", "rollout.partial=true", "rollout.partial_chunk_tokens=24"],
     "partial_chunk_tokens=24 must be below"),
])
def test_async_combinations_that_cannot_work_are_refused_in_one_line(bad, match):
    with pytest.raises(ValueError, match=match):
        load_config(None, bad)


# -- the controller in async mode --------------------------------------------------------------------------
def test_async_trains_the_lockstep_batches_in_order_never_beyond_the_lag_bound():
    """Engines far faster than the learner: the producer runs as far ahead as the bound lets it (lag 2 reached,
    never passed) and every batch is trained once, in the prompt stream's order, from its own seed."""
    lockstep = run(make(FakeEngines()), 8)
    roles = FakeEngines(update_s=0.1)
    outs = run(make(roles, *ASYNC, "rollout.sync.max_off_policy_lag=2"), 8)
    assert [o.prompts for o in outs] == [o.prompts for o in lockstep]
    assert roles.seeds == [generation_seed(0, i) for i in range(8)]  # none sampled beyond the last step
    lags = [o.metrics["async/staleness_max"] for o in outs]
    assert max(lags) == 2 and all(o.metrics["sync/lag"] <= 2 for o in outs)
    assert all(o.metrics["async/dropped_batches"] == 0 for o in outs)
    assert outs[-1].metrics["sync/version"] == 8 and outs[0].metrics["sync/overlapped"] == 1


def test_partial_rollouts_continue_under_the_pushed_weights_with_per_token_versions_and_logprobs():
    """Scripted: the push after update b - 1 lands between batch b's first chunk (2 tokens) and the rest."""
    roles = FakeEngines(scripted=True, steps=5)
    outs = run(make(roles, *ASYNC, "rollout.sync.max_off_policy_lag=1", "rollout.partial=true",
                    "rollout.partial_chunk_tokens=2", steps=5), 5)
    assert outs[0].metrics["async/rows_across_versions"] == 0 and outs[0].metrics["sync/lag"] == 0
    for b in range(1, 5):
        m = outs[b].metrics
        assert m["async/rows_across_versions"] == 6  # every sequence of the batch
        assert (m["async/tokens_lag1"], m["async/tokens_lag0"]) == (12, 18)  # 2 of 5 tokens a row at b - 1
        assert m["sync/lag"] == 1
        # the learner gets each token's own sampler's log-prob
        expect = torch.tensor([logp_of(b - 1)] * 2 + [logp_of(b)] * 3)
        assert torch.allclose(roles.trained_old_logp[b], expect.expand(6, 5))


def test_a_batch_beyond_the_bound_is_dropped_counted_and_replaced(caplog):
    roles = FakeEngines(update_s=0.02, stale_batch=3)
    with caplog.at_level("WARNING", logger="rlhf_ray.rl.producer"):
        outs = run(make(roles, *ASYNC, "rollout.sync.max_off_policy_lag=1", steps=6), 6)
    lockstep = run(make(FakeEngines()), 7)
    trained = [o.prompts for o in outs]
    assert trained == [o.prompts for o in lockstep[:3] + lockstep[4:7]]  # batch 3 never trained
    assert [o.metrics["async/dropped_batches"] for o in outs] == [0, 0, 0, 1, 1, 1]
    assert "batch 3 was sampled at weight version 0" in caplog.text and "dropped" in caplog.text
    assert len(roles.seeds) == 7 and len(roles.trained_old_logp) == 6


class DiesOnce(FakeEngines):
    """Its `die_at`-th engine call dies (`.result()` raises RayActorError, as a generator actor's does when its
    process is killed mid-call) and samples nothing; every call's (rows, n, seed, limits) in `calls`."""

    def __init__(self, die_at: int, **kw):
        super().__init__(**kw)
        self.die_at, self.calls = die_at, []

    def submit(self, prompt_ids, n, seed, max_new_tokens=None):
        self.calls.append((len(prompt_ids), n, seed, list(max_new_tokens or [])))
        if len(self.calls) != self.die_at:
            return super().submit(prompt_ids, n, seed, max_new_tokens)

        def dead(_self):
            from ray.exceptions import RayActorError
            raise RayActorError(error_msg="the generator engine's process died (killed in the test)")
        return type("Pending", (), {"result": dead})()


def test_only_an_engine_death_is_asked_again_and_only_once():
    from ray.exceptions import RayActorError
    from rlhf_ray.rl.roles import sample_again_if_an_engine_died

    def calls_until(errors):  # raises errors[k] on call k, then answers "ok"
        made = []

        def call():
            made.append(1)
            if len(made) <= len(errors):
                raise errors[len(made) - 1]
            return "ok"
        return call, made

    call, made = calls_until([RayActorError()])
    assert sample_again_if_an_engine_died(call) == "ok" and len(made) == 2
    call, made = calls_until([RayActorError(), RayActorError()])  # died again: the run's failure
    with pytest.raises(RayActorError):
        sample_again_if_an_engine_died(call)
    call, made = calls_until([ValueError("a bad prompt")])  # not a death: raised as it is, not asked again
    with pytest.raises(ValueError, match="a bad prompt"):
        sample_again_if_an_engine_died(call)
    assert len(made) == 1


def test_an_engine_that_dies_in_an_async_chunk_is_asked_again_as_in_lockstep():
    """The lockstep rule (`sample_again_if_an_engine_died`, the distributed placement's `generate`): the call an
    engine died in (batch 1's first continuation, a partial sequence mid-way) is made again with the same
    prompts, seed and limits, and the run trains the lockstep batches, none lost, none doubled."""
    lockstep = run(make(FakeEngines()), 8)
    roles = DiesOnce(die_at=5, update_s=0.02)  # batch 0: calls 1-3 (2 + 2 + 1 tokens); batch 1: 4 first, 5 next
    outs = run(make(roles, *ASYNC, "rollout.sync.max_off_policy_lag=1", "rollout.partial=true",
                    "rollout.partial_chunk_tokens=2"), 8)
    assert roles.calls[4] == roles.calls[5] and roles.calls[4][1] == 1  # a continuation, asked again alike
    assert [o.prompts for o in outs] == [o.prompts for o in lockstep]
    assert roles.seeds == [generation_seed(0, i) for i in range(8)] and len(roles.calls) == 3 * 8 + 1
    assert all(o.metrics["async/dropped_batches"] == 0 for o in outs)


@pytest.mark.parametrize("extra", [(), ("rollout.partial=true", "rollout.partial_chunk_tokens=2")])
def test_async_resume_trains_every_step_exactly_once(extra, caplog):
    """Stopped after step 3 with batches buffered ahead, resumed from the state a checkpoint holds: the buffer
    is sampled again, and the steps train the same prompts, once each, as the uninterrupted run."""
    over = (*ASYNC, "rollout.sync.max_off_policy_lag=2", *extra)
    full = run(make(FakeEngines(update_s=0.05), *over), 8)
    a = make(FakeEngines(update_s=0.05), *over)
    first = [a.step() for _ in range(3)]
    deadline = time.time() + 10  # the producer fills its buffer ahead of step 3
    while a._async.buffered() < 2 and time.time() < deadline:
        time.sleep(0.02)
    assert a._async.buffered() == 2
    state = a.state_dict()
    a.close()
    b = make(FakeEngines(update_s=0.05), *over)
    with caplog.at_level("WARNING", logger="rlhf_ray.rl.producer"):
        b.load_state_dict(state)
    assert "async resume at step 3" in caplog.text and "sampling them again from batch 3" in caplog.text
    rest = run(b, 5)
    assert [o.prompts for o in first + rest] == [o.prompts for o in full]
    assert b.roles.seeds == [generation_seed(0, i) for i in range(3, 8)]
    assert rest[-1].metrics["sync/version"] == 8


def test_an_async_checkpoint_resumes_in_another_mode_on_the_same_prompts(tmp_path):
    """The resume point is the same in every mode: an async run stopped after step 3 and resumed with the lag-1
    overlap (rollout.mode and rollout.partial may change on --resume) trains the lockstep run's prompts."""
    from rlhf_ray.rl.plateau import check_resume_overrides
    full = run(make(FakeEngines()), 8)
    a = make(FakeEngines(update_s=0.05), *ASYNC, "rollout.sync.max_off_policy_lag=1", "rollout.partial=true",
             "rollout.partial_chunk_tokens=2")
    first = [a.step() for _ in range(3)]
    state = a.state_dict()
    a.close()
    b = make(FakeEngines(), "rollout.sync.max_off_policy_lag=1")
    b.load_state_dict(state)
    assert [o.prompts for o in first + run(b, 5)] == [o.prompts for o in full]
    path = tmp_path / "run_config.json"
    check_resume_overrides(path, load_config(None, [*ASYNC, "rollout.sync.max_off_policy_lag=1"]), resume=False)
    assert check_resume_overrides(path, load_config(None, ["rollout.sync.max_off_policy_lag=1"]), resume=True) == [
        "rollout.mode"]
