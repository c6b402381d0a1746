"""The offline stages (SFT, reward model, DPO): their data, their loss functions, their drivers.

Loss functions are module-level (`fn(learner, micro_batch) -> (loss, stats)`) so that Ray pickles them
by reference; the math lives in `rlhf_ray.algo` (`sft_loss`, `bradley_terry_loss`).
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Optional

import torch

from rlhf_ray.config.schema import Config
from rlhf_ray.data.encode import Limits, collate_preferences, collate_sft, encode_preferences, encode_sft
from rlhf_ray.data.sources import load_rows, split_eval
from rlhf_ray.models.kit import resolve_model_path
from rlhf_ray.offline.data import StageData
from rlhf_ray.offline.loop import run_stage


# -- losses -------------------------------------------------------------------------------------
def sft_step_loss(learner, mb: dict) -> tuple[torch.Tensor, dict]:
    """Next-token NLL on response tokens: logits at t score token t+1."""
    from rlhf_ray.algo import sft_loss
    logits = learner.forward_logits(mb["input_ids"], mb["attention_mask"])  # (B, L, V)
    return sft_loss(logits[:, :-1], mb["input_ids"][:, 1:], mb["loss_mask"][:, 1:])


def sft_eval(learner, mb: dict) -> dict:
    loss, stats = sft_step_loss(learner, mb)
    return {"loss": float(loss)}


def rm_step_loss(learner, mb: dict, margin: Optional[float] = None) -> tuple[torch.Tensor, dict]:
    """Bradley-Terry on one forward pass over [chosen; rejected] (they share the padded length)."""
    from rlhf_ray.algo import bradley_terry_loss
    b = len(mb["chosen_ids"])
    scores = learner.forward_scores(torch.cat([mb["chosen_ids"], mb["rejected_ids"]]),
                                    torch.cat([mb["chosen_mask"], mb["rejected_mask"]]))  # (2B,)
    return bradley_terry_loss(scores[:b], scores[b:], margin)


def rm_eval(learner, mb: dict) -> dict:
    loss, stats = rm_step_loss(learner, mb)
    return {"loss": float(loss), "accuracy": stats["rm/accuracy"], "margin": stats["rm/margin"]}


# -- data ---------------------------------------------------------------------------------------
def _limits(cfg: Config) -> Limits:
    d = cfg.data
    return Limits(max_prompt_len=d.max_prompt_len, max_seq_len=d.max_seq_len, on_long_prompt=d.on_long_prompt)


def _tokenizer(cfg: Config, init_path: str):
    from rlhf_ray.learner.build import load_tokenizer
    return load_tokenizer(cfg.model, resolve_model_path(init_path))


def _stage_data(cfg: Config, init_path: str, spec: str, kind: str, encode, collate) -> StageData:
    """Read, split and encode a stage's rows; `info` counts what was read, skipped and truncated."""
    tok = _tokenizer(cfg, init_path)
    rows, read = load_rows(spec, kind, cfg.data, cfg.run.seed)
    train, held = split_eval(rows, cfg.data.eval_fraction, cfg.run.seed)
    train_ex, c1 = encode(train, tok, _limits(cfg))
    eval_ex, c2 = encode(held, tok, _limits(cfg))
    info = {"rows": read.rows, "rows_skipped": read.skipped, "train": len(train_ex), "eval": len(eval_ex),
            **(c1 + c2)}
    return StageData(train_ex, eval_ex, functools.partial(collate, pad_id=tok.pad_token_id), info)


def sft_data(cfg: Config, init_path: str) -> StageData:
    return _stage_data(cfg, init_path, cfg.data.sft, "sft", encode_sft, collate_sft)


def preference_data(cfg: Config, init_path: str) -> StageData:
    return _stage_data(cfg, init_path, cfg.data.preferences, "preferences", encode_preferences, collate_preferences)


# -- drivers ------------------------------------------------------------------------------------
def stage_dir(cfg: Config, name: str) -> Path:
    return Path(cfg.run.output_dir) / name


def sft_init_path(cfg: Config) -> str:
    return cfg.sft.init_from or cfg.model.path


def _after_sft(cfg: Config, init_from: Optional[str]) -> str:
    """`init_from`, else this run's SFT model when the run has an SFT stage and it exists, else model.path."""
    if init_from:
        return init_from
    sft_model = stage_dir(cfg, "sft") / "model"
    if "sft" in cfg.run.stages and (sft_model / "COMPLETE").exists():
        return str(sft_model)
    return cfg.model.path


def rm_init_path(cfg: Config) -> str:
    """The reward model starts from the SFT policy's backbone (a fresh scalar head) unless told otherwise."""
    return _after_sft(cfg, cfg.rm.init_from)


def dpo_init_path(cfg: Config) -> str:
    return _after_sft(cfg, cfg.dpo.init_from)


def prepare(cfg: Config, stage: str) -> StageData:
    """Read and tokenize a stage's data (before Ray starts, so bad data fails in seconds)."""
    if stage == "sft":
        return sft_data(cfg, sft_init_path(cfg))
    return preference_data(cfg, rm_init_path(cfg) if stage == "rm" else dpo_init_path(cfg))


def run_sft(cfg: Config, *, fresh: bool = False, data: Optional[StageData] = None) -> Path:
    """Train the policy on `data.sft`; needs Ray up. Returns `<output_dir>/sft/model`."""
    init = sft_init_path(cfg)
    return run_stage("sft", cfg, cfg.sft, kind="policy", init_path=init, data=data or prepare(cfg, "sft"),
                     loss_fn=sft_step_loss, eval_fn=sft_eval, out_dir=stage_dir(cfg, "sft"), fresh=fresh)


def run_rm(cfg: Config, *, fresh: bool = False, data: Optional[StageData] = None) -> Path:
    """Train the reward model on `data.preferences`; needs Ray up. Returns `<output_dir>/rm/model`."""
    init = rm_init_path(cfg)
    return run_stage("rm", cfg, cfg.rm, kind="reward", init_path=init, data=data or prepare(cfg, "rm"),
                     loss_fn=functools.partial(rm_step_loss, margin=cfg.rm.margin), eval_fn=rm_eval,
                     out_dir=stage_dir(cfg, "rm"), fresh=fresh)


def run_dpo(cfg: Config, *, fresh: bool = False, data: Optional[StageData] = None) -> Path:
    """Train the policy on `data.preferences` with DPO; needs Ray up. Returns `<output_dir>/dpo/model`."""
    from rlhf_ray.offline.dpo import DPOStep
    step = DPOStep(cfg.dpo.beta, cfg.dpo.label_smoothing)
    return run_stage("dpo", cfg, cfg.dpo, kind="policy", init_path=dpo_init_path(cfg),
                     data=data or prepare(cfg, "dpo"), loss_fn=step, eval_fn=step.evaluate,
                     out_dir=stage_dir(cfg, "dpo"), fresh=fresh)


def run_offline_stage(cfg: Config, stage: str, *, fresh: bool = False, data: Optional[StageData] = None) -> Path:
    """Run the offline stage named `stage` ("sft", "rm" or "dpo"); needs Ray up."""
    return OFFLINE_STAGES[stage](cfg, fresh=fresh, data=data)


OFFLINE_STAGES = {"sft": run_sft, "rm": run_rm, "dpo": run_dpo}
