"""The loop shared by the SFT and reward-model stages: batches -> group.train_step -> log / eval / save.

Data order is a pure function of (seed, epoch): epoch e visits the training examples in the order of a
permutation seeded with `seed + e`, in batches of `batch_size` (a last partial batch is not used). So the
data position is just the optimizer step, and a resumed run sees exactly the batches it would have seen.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from rlhf_ray.config.schema import Config, StageConfig
from rlhf_ray.learner.checkpoint import latest_checkpoint, prune_checkpoints
from rlhf_ray.learner.group import LearnerGroup
from rlhf_ray.offline.metrics import MetricsLogger

KEEP_CHECKPOINTS = 2


@dataclass
class StageData:
    train: list[dict]                         # encoded examples
    eval: list[dict]
    collate: Callable[[list[dict]], dict]     # examples -> batch of tensors
    info: dict                                # counts for the log (rows read, skipped, truncated, ...)


def epoch_order(n: int, epoch: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed + epoch)
    return torch.randperm(n, generator=g).tolist()


def plan(name: str, stage: StageConfig, n_train: int) -> tuple[int, int]:
    """-> (steps per epoch, total optimizer steps)."""
    from rlhf_ray.config import ConfigError
    per_epoch = n_train // stage.batch_size
    if per_epoch == 0:
        raise ConfigError(f"{name}.batch_size={stage.batch_size} is larger than the {n_train} training examples")
    if stage.batch_size % stage.learner.num_ranks:
        raise ConfigError(f"{name}.batch_size={stage.batch_size} must be divisible by {name}.learner.num_ranks="
                          f"{stage.learner.num_ranks}")
    total = per_epoch * stage.epochs
    return per_epoch, min(total, stage.max_steps) if stage.max_steps else total


def evaluate(group: LearnerGroup, data: StageData, eval_fn: Callable, batch_size: int) -> dict:
    """Row-weighted mean of `eval_fn` stats over the eval set (cut to a multiple of the rank count)."""
    n = len(data.eval) - len(data.eval) % group.num_ranks
    size = max(group.num_ranks, batch_size - batch_size % group.num_ranks)
    sums: dict[str, float] = {}
    for i in range(0, n, size):
        chunk = data.eval[i:min(i + size, n)]
        stats = group.evaluate(eval_fn, data.collate(chunk))
        for k, v in stats.items():
            sums[k] = sums.get(k, 0.0) + v * len(chunk)
    if n == 0:
        return {}
    return {f"eval/{k}": v / n for k, v in sums.items()} | {"eval/rows": float(n)}


def run_stage(name: str, cfg: Config, stage: StageConfig, *, kind: str, init_path: str, data: StageData,
              loss_fn: Callable, eval_fn: Callable, out_dir: Path, fresh: bool = False) -> Path:
    """Train, checkpoint, evaluate and export one offline stage; returns the exported HF folder."""
    per_epoch, total = plan(name, stage, len(data.train))
    ckpt_root = out_dir / "checkpoints"
    if fresh:
        shutil.rmtree(ckpt_root, ignore_errors=True)
    threads = cfg.cluster.torch_threads or max(1, int(stage.learner.cpus_per_rank))
    group = LearnerGroup(cfg.model, stage.learner, kind=kind, init_path=init_path, total_steps=total,
                         device=cfg.cluster.device, seed=cfg.run.seed, num_threads=threads,
                         placement_strategy=cfg.cluster.placement_strategy)
    try:
        start = 0
        resume_from: Optional[Path] = latest_checkpoint(ckpt_root)
        if resume_from is not None:
            start = int(group.load_checkpoint(str(resume_from))["step"])
        logger = MetricsLogger(out_dir, cfg.logging, total_steps=total, start_step=start, title=name)
        logger.log(start, {f"data/{k}": float(v) for k, v in data.info.items()}
                   | {"resumed_from_step": float(start)}, advance=False)
        for step in range(start, total):
            epoch, pos = divmod(step, per_epoch)
            order = epoch_order(len(data.train), epoch, cfg.run.seed)
            idx = order[pos * stage.batch_size:(pos + 1) * stage.batch_size]
            t0 = time.perf_counter()
            stats = group.train_step(loss_fn, data.collate([data.train[i] for i in idx]))
            stats["time/step_s"] = time.perf_counter() - t0
            stats["epoch"] = epoch + pos / per_epoch
            if stage.eval_every and (step + 1) % stage.eval_every == 0 and data.eval:
                stats |= evaluate(group, data, eval_fn, stage.batch_size)
            logger.log(step + 1, stats)
            if stage.save_every and (step + 1) % stage.save_every == 0 and step + 1 < total:
                group.save_checkpoint(str(ckpt_root / f"step_{step + 1:06d}"), {"step": step + 1})
                prune_checkpoints(ckpt_root, KEEP_CHECKPOINTS)
        final_eval = evaluate(group, data, eval_fn, stage.batch_size) if data.eval else {}
        if final_eval:
            logger.log(total, final_eval, advance=False)
        logger.close()
        if final_eval:
            print(f"{name}: held-out " + ", ".join(f"{k.removeprefix('eval/')}={v:.4g}" for k, v in final_eval.items()))
        final = out_dir / "model"
        group.export_hf(str(final), merge_lora=True)
        if cfg.model.lora.enabled:
            group.export_hf(str(out_dir / "adapter"), merge_lora=False)
        return final
    finally:
        group.shutdown()
