"""The policy role: log-probs, reference log-probs (adapter off under LoRA) and PPO updates of one
learner rank. `PolicyWorker` is the plain class (testable without Ray); `PolicyRank` its Ray shell, a
`LearnerRank` so that N of them form a DeepSpeed group placed by `LearnerGroup`. On N ranks each rank
runs its own share of every minibatch and DeepSpeed averages the gradients; the token-mean stays the
minibatch's own (rlhf_ray.roles.losses.token_weight).
"""
from __future__ import annotations

import time

import torch

from rlhf_ray import algo
from rlhf_ray.batch import SequenceBatch
from rlhf_ray.config import AlgorithmConfig, ReferenceConfig
from rlhf_ray.learner.group import LearnerRank
from rlhf_ray.dispatch import micro_batches_of, per_token_over_micro_batches, scoring_micro_batches
from rlhf_ray.roles.losses import OBJECTIVE, forward_response_logits, policy_minibatch_loss, token_weight
from rlhf_ray.records import TrainBatch, UpdateResult
from rlhf_ray.sync.checks import Agreement, logprob_agreement
from rlhf_ray.utils.phases import set_phase_threads, timed


class PolicyWorker:
    def __init__(self, learner, algo_cfg: AlgorithmConfig, ref_cfg: ReferenceConfig, *, temperature: float,
                 norm_len: int):
        self.learner = learner
        self.algo, self.ref_cfg, self.mbs = algo_cfg, ref_cfg, learner.cfg.micro_batch_size
        self.max_tokens = learner.cfg.max_tokens_per_micro_batch  # None: micro-batches of mbs rows
        self.temperature, self.norm_len = temperature, norm_len

    def ref_logprobs(self, seq: SequenceBatch, team=None) -> torch.Tensor:
        """(B, T) reference log-probs: the same model with its LoRA adapter switched off. Without LoRA this
        is called only when the run has no KL term (the plan starts no reference): the policy's own
        log-probs, so the reported KL is 0."""
        if not self.learner.lora:
            return self.logprobs(seq, team)
        with self.learner.reference_context():  # held here: the team's threads compute inside it
            return self.logprobs(seq, team)

    @torch.no_grad()
    def logprobs(self, seq: SequenceBatch, team=None) -> torch.Tensor:
        """(B, T) log-probs of the response tokens under the current weights, by micro-batches of
        `micro_batch_size` rows or of `max_tokens_per_micro_batch` tokens, each one's rows split over `team`
        (`rlhf_ray.utils.phases.CoreTeam`; None: one pass)."""
        self.learner.ds_engine.eval()
        parts = scoring_micro_batches(seq, self.mbs, self.max_tokens)
        return per_token_over_micro_batches(seq, parts, lambda mb: algo.token_logprobs(
            forward_response_logits(self.learner, mb), mb.response_ids, self.temperature).cpu(), team,
            packed=self.learner.packed_mask_dtype is not None)

    def update(self, batch: TrainBatch, minibatches: list[list[torch.Tensor]], kl_coef: float, rank: int = 0,
               world: int = 1) -> UpdateResult:
        """PPO epochs: one optimizer step per minibatch (of all ranks; this rank runs its share). The very
        first forward (before any step) also measures the learner-vs-generator log-prob agreement."""
        t0 = time.perf_counter()
        first: list[Agreement] = []   # one part per micro-batch of the first optimizer step
        sums: dict[str, float] = {}
        steps = 0
        # An IS correction needs the learner's log-probs before any step (the proximal policy). With a single
        # optimizer step every micro-batch's own forward runs on exactly those weights: its detached log-probs
        # are the proximal ones (PPO ratio 1, as in TRL), and a separate forward would only recompute them.
        # "auto" is resolved by the whole config (rlhf_ray.config.schema); a section built alone leaves it
        # unresolved, which corrects nothing, as algorithm.tis=auto did
        corrects = self.algo.is_correction not in ("none", "auto")
        live = corrects and proximal_is_live(minibatches, self.learner.model)
        proximal = self.logprobs(batch.seq) if corrects and not live else None

        def loss_fn(learner, mb):
            tb = batch.select(mb["idx"].cpu()).trimmed()  # the micro-batch's own width
            logits = forward_response_logits(learner, tb.seq)  # the model's dtype: log-probs upcast per chunk
            if self.algo.entropy_coef > 0:  # a bonus term needs the entropy's own gradient: the loss computes it
                logp, entropy = algo.token_logprobs(logits, tb.seq.response_ids, self.temperature), None
            else:  # the reported entropy comes with the log-probs, from one pass over the logits
                logp, entropy = algo.token_logprobs_and_entropy(logits, tb.seq.response_ids, self.temperature)
            width = logp.shape[1]
            prox = logp.detach() if live else None if proximal is None else proximal[mb["idx"].cpu(), :width]
            loss, stats = policy_minibatch_loss(logits, logp, tb, self.algo, self.ref_cfg, kl_coef, self.temperature,
                                                self.norm_len, prox, entropy)
            loss = loss * token_weight(self.algo.loss_agg, tb.seq.response_mask, mb)
            if steps == 0:
                first.append(logprob_agreement(logp.detach(), tb.old_logp, tb.seq.response_mask))
            return loss, stats

        for epoch in minibatches:
            for rows in epoch:
                mine = micro_batches_of(rows, batch.seq, self.mbs, self.max_tokens, rank, world)
                stats = self.learner.train_step(loss_fn, mine)
                steps += 1
                for k, v in stats.items():
                    key = k if "/" in k else f"policy/{OBJECTIVE.get(k, k)}"
                    sums[key] = sums.get(key, 0.0) + v
        return UpdateResult({k: v / max(steps, 1) for k, v in sums.items()}, Agreement.merge(first),
                            time.perf_counter() - t0)


def proximal_is_live(minibatches: list[list[torch.Tensor]], model: torch.nn.Module) -> bool:
    """Whether the update's own forwards give the proximal log-probs: one optimizer step in all (one
    epoch of one minibatch), so no forward sees updated weights, and no dropout, so the train-mode forward
    equals the eval-mode one."""
    return sum(len(epoch) for epoch in minibatches) == 1 and not has_dropout(model)


def has_dropout(model: torch.nn.Module) -> bool:
    """Any active dropout: a Dropout module with p > 0, or an attention dropout in the model's config."""
    if any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules()):
        return True
    config = getattr(model, "config", None)
    return any(float(getattr(config, k, 0.0) or 0.0) > 0 for k in ("attention_dropout", "hidden_dropout",
                                                                      "attn_pdrop", "resid_pdrop"))


class PolicyRank(LearnerRank):
    """The policy's Ray shell: `PolicyWorker(learner, algo_cfg=, ref_cfg=, temperature=, norm_len=)`."""
    WORKER = PolicyWorker

    def ref_logprobs(self, seq, threads: int = 0):
        set_phase_threads(threads)
        return timed(self.worker.ref_logprobs, seq)

    def update(self, batch, minibatches, kl_coef: float, threads: int = 0, cores=None) -> UpdateResult:
        set_phase_threads(threads, cores)
        return self.worker.update(batch, minibatches, kl_coef, self.rank, self.world_size)
