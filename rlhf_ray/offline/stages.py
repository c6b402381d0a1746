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
from rlhf_ray.offline.loop import StageSpec, run_stages, stage_groups


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


def _stage_data(cfg: Config, tokenizer_path: str, spec: str, kind: str, encode, collate) -> StageData:
    """Read, split and encode a stage's rows; `info` counts what was read, skipped and truncated."""
    tok = _tokenizer(cfg, tokenizer_path)
    rows, read = load_rows(spec, kind, cfg.data, cfg.run.seed)
    train, held = split_eval(rows, cfg.data.eval_fraction, cfg.run.seed)
    train_ex, c1 = encode(train, tok, _limits(cfg))
    eval_ex, c2 = encode(held, tok, _limits(cfg))
    info = {"rows": read.rows, "rows_skipped": read.skipped, "train": len(train_ex), "eval": len(eval_ex),
            **(c1 + c2)}
    return StageData(train_ex, eval_ex, functools.partial(collate, pad_id=tok.pad_token_id), info)


# -- drivers ------------------------------------------------------------------------------------
def stage_dir(cfg: Config, name: str) -> Path:
    return Path(cfg.run.output_dir) / name


def sft_init_path(cfg: Config) -> str:
    return cfg.sft.init_from or cfg.model.path


def _after_sft(cfg: Config, init_from: Optional[str]) -> str:
    """`init_from`, else this run's SFT model when the run has an SFT stage and it exists, else model.path
    (one that the same Ray Train run writes first: `_from_pending_sft`)."""
    if init_from:
        return init_from
    sft_model = stage_dir(cfg, "sft") / "model"
    if "sft" in cfg.run.stages and (sft_model / "COMPLETE").exists():
        return str(sft_model)
    return cfg.model.path


def init_path(cfg: Config, stage: str) -> str:
    """The model a stage starts from. The reward model starts from the SFT policy's backbone (a fresh scalar
    head) unless told otherwise; so does DPO."""
    if stage == "sft":
        return sft_init_path(cfg)
    return _after_sft(cfg, cfg.rm.init_from if stage == "rm" else cfg.dpo.init_from)


def _from_pending_sft(cfg: Config, stage: str, sft_first: bool) -> bool:
    """`stage` starts from the SFT model that its own Ray Train run writes first (not on disk yet)."""
    return stage != "sft" and sft_first and not (cfg.rm.init_from if stage == "rm" else cfg.dpo.init_from)


def prepare(cfg: Config, stage: str, sft_first: bool = False) -> StageData:
    """Read and tokenize a stage's data (before Ray starts, so bad data fails in seconds). A stage that starts
    from an SFT model not written yet reads with the SFT stage's tokenizer: its export saves that one."""
    sft_tokenizer = stage == "sft" or _from_pending_sft(cfg, stage, sft_first)
    tokenizer_path = sft_init_path(cfg) if sft_tokenizer else init_path(cfg, stage)
    if stage == "sft":
        return _stage_data(cfg, tokenizer_path, cfg.data.sft, "sft", encode_sft, collate_sft)
    return _stage_data(cfg, tokenizer_path, cfg.data.preferences, "preferences", encode_preferences,
                       collate_preferences)


def stage_spec(cfg: Config, name: str, sft_first: bool = False, data: Optional[StageData] = None) -> StageSpec:
    """What the driver needs to run stage `name`; `sft_first`: an SFT stage runs before it in the same run."""
    # absolute here, where a relative path means what the user meant: Ray Train's workers run elsewhere
    init = str((stage_dir(cfg, "sft") / "model").resolve()) if _from_pending_sft(cfg, name, sft_first) \
        else resolve_model_path(init_path(cfg, name))
    data = data or prepare(cfg, name, sft_first)
    common = dict(name=name, stage=getattr(cfg, name), init_path=init, data=data, out_dir=stage_dir(cfg, name))
    if name == "sft":
        return StageSpec(kind="policy", loss_fn=sft_step_loss, eval_fn=sft_eval, **common)
    if name == "rm":
        return StageSpec(kind="reward", loss_fn=functools.partial(rm_step_loss, margin=cfg.rm.margin),
                         eval_fn=rm_eval, **common)
    from rlhf_ray.offline.dpo import DPOStep
    step = DPOStep(cfg.dpo.beta, cfg.dpo.label_smoothing)
    return StageSpec(kind="policy", loss_fn=step, eval_fn=step.evaluate, **common)


def run_offline_stages(cfg: Config, names: list[str], *, skip: tuple[str, ...] = (), fresh: bool = False,
                       data: Optional[dict[str, StageData]] = None) -> dict[str, Path]:
    """Run the offline stages `names` (in order; a subset of "sft", "rm", "dpo"), consecutive ones that ask
    for the same workers in one Ray Train run (`offline.loop`); needs Ray up. `skip`: stages of `names`
    already finished (`--resume`), which still name their run. Returns each run stage's `<output_dir>/<stage>/model`."""
    out: dict[str, Path] = {}
    for group in stage_groups(cfg, names):
        todo = [name for name in group if name not in skip]
        if not todo:
            continue
        specs = [stage_spec(cfg, name, sft_first="sft" in todo[:i], data=(data or {}).get(name))
                 for i, name in enumerate(todo)]
        out |= dict(zip(todo, run_stages(cfg, group, specs, fresh=fresh)))
    return out


def run_offline_stage(cfg: Config, stage: str, *, fresh: bool = False, data: Optional[StageData] = None) -> Path:
    """Run the offline stage named `stage` ("sft", "rm" or "dpo") on its own; needs Ray up."""
    return run_offline_stages(cfg, [stage], fresh=fresh, data={stage: data} if data else None)[stage]
