"""Asynchronous rollouts (`rollout.mode=async`): a driver thread keeps sampling batches while the learner trains.

    producer thread:  permit -> prompts -> generate (in chunks with rollout.partial) -> buffer
    controller:       take a batch -> its staleness checked -> score -> update -> weight push

The bound. The producer needs one of `max_off_policy_lag` permits to start a batch and the controller hands one
back when it takes a batch, so at most L batches are ahead of the one being trained. A batch started while the
learner is at version u is taken after at most L - 1 others, each trained and pushed at most once (the weight
sync adds one version per push, `rlhf_ray.sync.weight_sync`), plus the one in training when it started: it is
taken at version <= u + L. With L = 1 this is the lag-1 overlap (the next batch sampled beside the update); a
batch taken further behind than L (which the bound should make impossible) is dropped and counted, not trained.

Partial rollouts. vLLM's in-process CPU engine cannot be interrupted inside `generate`, and an engine's calls
run one at a time (a colocated rank's engine thread, a distributed engine actor), so a push queued behind a
whole generation would wait for all of it. With `rollout.partial` every sequence samples at most
`partial_chunk_tokens` per call and the next chunk continues from its prompt and tokens so far: a push waits for
one chunk at most and lands between chunks, and the continuation samples under the new weights. Each token keeps
the version and log-prob it was sampled with; the policy's IS correction (algorithm.is_correction) weighs every
token by pi_proximal / pi_sampler with its own sampler's log-prob. The engine re-reads the prefix from the
tokens (its prefix cache is reset at every push, so nothing older is reused).
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

from rlhf_ray.records import Rollout
from rlhf_ray.rl.roles import sample_again_if_an_engine_died

if TYPE_CHECKING:
    from rlhf_ray.config import RolloutConfig
    from rlhf_ray.rl.prompt_stream import PromptStream
    from rlhf_ray.rl.roles import RoleGraph

log = logging.getLogger(__name__)

# generate(prompt_ids, n, seed, max_new_tokens per prompt) -> Rollout: one engine call (all engines)
Generate = Callable[[list, int, int, list[int]], Rollout]


def chunk_seed(seed: int, chunk: int) -> int:
    """Chunk c of a batch samples from its own seed, so a resumed run's chunks repeat the first run's."""
    return (seed + 104_729 * chunk) % (2 ** 30)


def sample_in_chunks(generate: Generate, prompt_ids: list, n: int, seed: int, budget: int, chunk: int,
                     decode: Optional[Callable[[list[list[int]]], list[str]]] = None) -> Rollout:
    """n samples per prompt of up to `budget` tokens, each engine call sampling at most `chunk` more per sequence.

    The first call samples n per prompt; later calls continue each unfinished sequence alone (n=1) from its prompt
    and tokens so far. A sequence is finished when its engine stopped it (EOS) or it reached `budget`.
    Response texts: `decode` of each whole response (the driver's tokenizer, as the engine decodes), else the
    chunks' texts joined. Joined is not always the whole: a tokenizer that drops a leading space when it decodes
    from a token would lose the space at a chunk's start, and a character split over two chunks would be lost
    (the rollout's stop strings are refused with partial rollouts for the same reason, `rlhf_ray.config.schema`)."""
    first = generate(prompt_ids, n, seed, [min(chunk, budget)] * len(prompt_ids))
    ids = [list(r) for r in first.response_ids]
    logps = [list(x) for x in first.response_logprobs]
    versions = [[first.weight_version] * len(r) for r in first.response_ids]
    texts, finish = list(first.texts), list(first.finish_reasons)
    engine_s, c = first.generate_s, 0
    stuck: set[int] = set()  # rows a continuation could not lengthen (a full context): ended as they are
    while open_rows := [b for b in range(len(ids))
                        if finish[b] == "length" and len(ids[b]) < budget and b not in stuck]:
        c += 1
        part = generate([list(first.prompt_ids[b]) + ids[b] for b in open_rows], 1, chunk_seed(seed, c),
                        [min(chunk, budget - len(ids[b])) for b in open_rows])
        for k, b in enumerate(open_rows):
            if not part.response_ids[k]:
                stuck.add(b)
            ids[b] += part.response_ids[k]
            logps[b] += part.response_logprobs[k]
            versions[b] += [part.weight_version] * len(part.response_ids[k])
            texts[b] += part.texts[k]
            finish[b] = part.finish_reasons[k]
        engine_s += part.generate_s
    if decode is not None:
        texts = decode(ids)
    oldest = min((v[0] for v in versions if v), default=first.weight_version)
    return Rollout(first.prompt_ids, ids, logps, texts, first.prompt_index, finish, oldest, first.temperature,
                   engine_s, response_versions=versions)


def staleness_metrics(rollout: Rollout, learner_version: int, max_lag: int) -> dict[str, float]:
    """How far behind the learner a batch's tokens were sampled: the token mean and the oldest token's lag, the
    share of tokens at each lag 0..max_lag (the versions that sampled the batch, counted from the learner), and
    how many sequences more than one version sampled (continued across a push)."""
    rows = rollout.token_versions()
    lags = [learner_version - v for row in rows for v in row]
    total = max(len(lags), 1)
    out = {"async/staleness_mean": sum(lags) / total, "async/staleness_max": float(max(lags, default=0)),
           "async/rows_across_versions": float(sum(len(set(r)) > 1 for r in rows))}
    for k in range(max_lag + 1):
        out[f"async/tokens_lag{k}"] = float(sum(x == k for x in lags))
    return out


@dataclass(frozen=True)
class Buffered:
    """One batch sampled ahead: its place in the run's sequence of batches and the prompt stream after it."""
    index: int             # the batch's number (its generation seed's); equals the step when nothing is dropped
    prompts: list          # the Prompt records it answers
    rollout: Rollout
    stream_after: dict     # the prompt stream's state once this batch's prompts were drawn (the resume point)


class RolloutProducer:
    """The thread that samples batches ahead (see the module docstring). The controller takes them in order."""

    def __init__(self, draw: Callable[[], tuple[list, dict]], sample: Callable[[list, int], Rollout],
                 permits: int, first_index: int, limit: int):
        """draw(): the next prompts and the stream's state after them; sample(prompts, index): their rollout.
        permits: max_off_policy_lag. Batches first_index .. limit - 1 are sampled (`extend` raises the limit when
        the controller drops one)."""
        self._draw, self._sample = draw, sample
        self._permits = threading.Semaphore(permits)
        self._ready: "queue.Queue[Any]" = queue.Queue()
        self._next, self._limit = first_index, limit
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rollout-producer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if not self._permits.acquire(timeout=0.05):
                    continue
                if self._next >= self._limit:  # every batch the run needs is out
                    self._permits.release()
                    if self._stop.wait(0.05):
                        return
                    continue
                prompts, after = self._draw()
                index, self._next = self._next, self._next + 1
                self._ready.put(Buffered(index, prompts, self._sample(prompts, index), after))
        except BaseException as e:  # noqa: BLE001 - handed to the controller, which raises it in its step
            self._ready.put(e)

    def take(self) -> tuple[Buffered, float]:
        """The oldest buffered batch (waiting for it if none is ready) and the seconds waited; a permit goes
        back, so the producer may start another."""
        t0 = time.perf_counter()
        item = self._ready.get()
        if isinstance(item, BaseException):
            raise item
        self._permits.release()
        return item, time.perf_counter() - t0

    def extend(self) -> None:
        """One batch more than planned (the controller dropped one)."""
        self._limit += 1

    def buffered(self) -> int:
        return self._ready.qsize()

    def close(self, timeout_s: float = 30.0) -> int:
        """Stop sampling; returns how many batches were buffered and not trained (a call in flight ends first)."""
        self._stop.set()
        self._thread.join(timeout_s)
        return self._ready.qsize()


class AsyncRollouts:
    """The controller's side of async mode, one owner of its state: the producer (started at the first take, so
    after a resume's load), the number of the next batch to take, the resume point a checkpoint holds, the batches
    dropped, and the lock under which a call or a push is handed to the engines (every engine at once, so a push
    never lands between one call's engines, whose parts would answer at two versions; only the submission is
    held, never the generation)."""

    def __init__(self, roles: "RoleGraph", prompts: "PromptStream", rollout: "RolloutConfig",
                 seed_of: Callable[[int], int], decode: Optional[Callable[[list[list[int]]], list[str]]] = None):
        self.roles, self.prompts, self.cfg, self._seed_of = roles, prompts, rollout, seed_of
        self._decode = decode  # whole responses' text (sample_in_chunks)
        self.next_index, self.dropped = 0, 0
        self.engines = threading.Lock()
        self._resume: Optional[dict] = None   # the prompt stream after the last batch taken
        self._producer: Optional[RolloutProducer] = None

    def take(self, n: int, steps_left: int) -> tuple[list, Rollout, dict[str, float]]:
        """The oldest batch sampled ahead within the bound (one further behind is dropped, counted, replaced),
        its staleness statistics."""
        bound, waited = self.cfg.sync.max_off_policy_lag, 0.0
        if self._producer is None:
            self._start(n, steps_left)
        while True:
            item, wait_s = self._producer.take()
            waited += wait_s
            self.next_index, self._resume = item.index + 1, item.stream_after
            version = self.roles.weights.version
            if version - item.rollout.weight_version <= bound:
                break
            self.dropped += 1
            self._producer.extend()
            log.warning(f"async: batch {item.index} was sampled at weight version {item.rollout.weight_version}, "
                        f"{version - item.rollout.weight_version} behind the learner's {version} (rollout.sync."
                        f"max_off_policy_lag={bound}); dropped, not trained ({self.dropped} so far)")
        stats = staleness_metrics(item.rollout, version, bound)
        stats.update({"async/dropped_batches": float(self.dropped), "async/wait_s": waited,
                      "async/buffered": float(self._producer.buffered())})
        return item.prompts, item.rollout, stats

    def _start(self, n: int, steps_left: int) -> None:
        r = self.cfg
        chunk = r.partial_chunk_tokens if r.partial else r.max_new_tokens  # one call per batch unless partial
        self._resume = self.prompts.state_dict()

        def draw():  # the producer's thread is the only reader of the prompt stream from here on
            return self.prompts.next_batch(), self.prompts.state_dict()

        def sample(prompts: list, index: int) -> Rollout:
            return sample_in_chunks(self._engine_call, [p.ids for p in prompts], n, self._seed_of(index),
                                    r.max_new_tokens, chunk, decode=self._decode)

        self._producer = RolloutProducer(draw, sample, permits=r.sync.max_off_policy_lag,
                                         first_index=self.next_index, limit=self.next_index + steps_left)

    def _engine_call(self, prompt_ids: list, n: int, seed: int, limits: list[int]) -> Rollout:
        """One generation on every engine, beside whatever the learner does; made again, as in lockstep, if an
        engine died in it (the submission that heals the restarted engine holds the lock too)."""
        def call() -> Rollout:
            with self.engines:
                pending = self.roles.submit(prompt_ids, n, seed, max_new_tokens=limits)
            return pending.result()
        return sample_again_if_an_engine_died(call)

    def resume_point(self) -> dict:
        """What a checkpoint holds of the prompt stream: its state after the last batch taken. The buffer and the
        partial sequences are not saved; a resumed run samples them again (`resumed` says so)."""
        return self._resume if self._resume is not None else self.prompts.state_dict()

    def resumed(self, next_index: int, step: int) -> None:
        self.next_index = next_index
        log.warning(f"async resume at step {step}: batches buffered or in flight at the checkpoint were not saved; "
                    f"sampling them again from batch {next_index} with the restored weights (version "
                    f"{self.roles.weights.version})")

    def buffered(self) -> int:
        return self._producer.buffered() if self._producer is not None else 0

    def close(self) -> None:
        """Stop the producer: the batches it sampled ahead of the last step are not trained."""
        if self._producer is not None:
            left = self._producer.close()
            self._producer = None
            if left:
                log.info(f"async: {left} batch(es) sampled ahead of the last step were not trained")
