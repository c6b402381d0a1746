"""What runs inside each Ray Train worker of the offline stages: per stage one `Learner` (DeepSpeed) per rank,
the loop over batches, evaluation, checkpoints through Ray Train's checkpoint API, the final export; the
stages of one run (`offline.loop`) one after the other, each learner freed before the next is built.

Why Ray Train here, and a controller-driven rank group for the RL learner (`learner/group.py`): an offline
stage is one loop over a fixed dataset that a trainer can own from start to end (`TorchTrainer.fit()`), so
Ray Train's checkpoint bookkeeping, failure retries, scaling and train state come with it. The RL learner
is called step by step by the RL controller, between generation and scoring, with its model resident
across calls (the verl / OpenRLHF pattern); a trainer that owns the loop cannot be driven that way.

Every rank calls `ray.train.report` at the same steps (it is a barrier and Ray Train requires equal
counts): each checkpoint (`save_every`), each evaluation (`eval_every`) and the end. Not every step: a
report waits for the controller to take the previous one (a 1-deep queue it polls), which cost 1.7 s per
step here against a 0.2 s step. Rank 0 streams every step's stats to the driver instead (`metrics`, a Ray
queue: one actor call), where the progress bar and our metric sinks live.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from rlhf_ray.config.schema import Config, StageConfig
from rlhf_ray.dispatch import mean_stats, micro_batches, split_batch
from rlhf_ray.offline.data import StageData, batch_indices


@dataclass(frozen=True)
class StageJob:
    """Everything a worker needs, sent once through `train_loop_config`."""

    name: str                 # "sft" | "rm" | "dpo"
    cfg: Config
    stage: StageConfig
    kind: str                 # learner kind: "policy" | "reward"
    init_path: str
    data: StageData
    loss_fn: Callable         # (learner, micro_batch) -> (loss, stats)
    eval_fn: Callable         # (learner, micro_batch) -> stats
    out_dir: str              # the stage's folder (shared by every node): staging, export
    total_steps: int
    steps_per_epoch: int
    metrics: Any              # ray.util.queue.Queue: rank 0 -> driver
    logged: Any = None        # ray.util.queue.Queue: driver -> rank 0, (stage, step) once that step is written
    setup: Callable = None    # optional (learner) -> None, run once after the learner is built (DPO reference)
    token: str = ""           # this run's: written beside the export when the stage is done


FINISHED = ".finished_by"     # in the stage's folder: the token of the run that exported its model


def train_loop(config: dict) -> None:
    """Ray Train's `train_loop_per_worker`: the run's stages in order, each with its own learner. A worker
    group that Ray Train restarts skips the stages this run already finished, and resumes a stage only from a
    checkpoint of that stage."""
    import ray.train
    _quiet_report_lines()
    restored = ray.train.get_checkpoint()
    for job in config["jobs"]:
        if finished_in_this_run(job):
            continue
        train_stage(job, restored if restored is not None and checkpoint_stage(restored.path) == job.name else None)
        _free_memory()  # the stage's learner (DeepSpeed's engine holds reference cycles) before the next one's


def _free_memory() -> None:
    import gc
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def checkpoint_name(stage: str, step: int) -> str:
    return f"{stage}-step_{step:06d}"


def checkpoint_stage(path: str) -> str:
    """The stage a checkpoint folder (`checkpoint_name`) belongs to."""
    return Path(path).name.partition("-")[0]


def finished_in_this_run(job: StageJob) -> bool:
    marker = Path(job.out_dir) / FINISHED
    return marker.is_file() and marker.read_text() == job.token


def train_stage(job: StageJob, restored) -> None:
    """One stage on this rank: build its learner, resume from `restored` (a checkpoint of this stage) if
    given, train, evaluate, export; the learner is freed on return."""
    import ray.train

    from rlhf_ray.learner.learner import Learner
    from rlhf_ray.utils.device import resolve_backend
    cfg, stage = job.cfg, job.stage
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    threads = cfg.cluster.torch_threads or max(1, int(stage.learner.cpus_per_rank))
    # Ray Train's TorchConfig has set up the process group; DeepSpeed joins it.
    learner = Learner(cfg.model, stage.learner, kind=job.kind, init_path=job.init_path,
                      backend=resolve_backend(cfg.cluster.device, cfg.model.dtype),
                      total_updates=job.total_steps, seed=cfg.run.seed, num_threads=threads)
    if job.setup is not None:
        job.setup(learner)
    start = 0
    if restored is not None:
        with restored.as_directory() as path:
            start = int(learner.load_checkpoint(path)["step"])
    if rank == 0:
        job.metrics.put(("start", job.name, start, {}))
    staging = Path(job.out_dir) / ".staging"
    for step in range(start, job.total_steps):
        t0 = time.perf_counter()
        batch = job.data.collate([job.data.train[i] for i in batch_indices(
            len(job.data.train), step, job.steps_per_epoch, stage.batch_size, cfg.run.seed)])
        shard = split_batch(batch, world)[rank]
        stats = mean_over_ranks(learner.train_step(job.loss_fn, micro_batches(shard, stage.learner.micro_batch_size)))
        stats["time/step_s"] = time.perf_counter() - t0
        stats["epoch"] = step / job.steps_per_epoch
        evaluated = bool(stage.eval_every and (step + 1) % stage.eval_every == 0 and job.data.eval)
        if evaluated:
            stats |= evaluate(learner, job.data, job.eval_fn, stage.batch_size, rank, world)
        if rank == 0:
            job.metrics.put(("step", job.name, step + 1, stats))
        save = bool(stage.save_every and (step + 1) % stage.save_every == 0 and step + 1 < job.total_steps)
        if save and rank == 0:
            wait_until_logged(job, step + 1)
        if save or evaluated:
            _report(stats, step + 1, learner, staging / checkpoint_name(job.name, step + 1) if save else None, rank)
    final_eval = evaluate(learner, job.data, job.eval_fn, stage.batch_size, rank, world) if job.data.eval else {}
    if rank == 0 and final_eval:
        job.metrics.put(("final", job.name, job.total_steps, final_eval))
    if rank == 0:
        wait_until_logged(job, job.total_steps)
    _report(final_eval, job.total_steps, learner, None, rank)
    learner.export_hf(Path(job.out_dir) / "model", merge_lora=True)
    if cfg.model.lora.enabled:
        learner.export_hf(Path(job.out_dir) / "adapter", merge_lora=False)
    if rank == 0:
        (Path(job.out_dir) / FINISHED).write_text(job.token)
    learner.close()  # (export_hf ended on a barrier: a next stage starting from this export finds it whole)


def wait_until_logged(job: StageJob, step: int) -> None:
    """Wait until the driver has written every record put so far (through `step`), before a checkpoint or the
    export (the other ranks wait at its barrier): a checkpoint must never hold a step that no one logged.

    A barrier message travels behind the step records and the driver answers it only after writing them
    (`MetricsFollower`). Waiting for an empty queue was not enough: the driver takes a record, then writes it,
    and a driver SIGKILLed between the two lost that step for good once the checkpoint after it existed (a
    resumed reward model lacked step 24 of 160). A dead driver's worker blocks here until Ray ends the job,
    so it checkpoints nothing more."""
    job.metrics.put(("logged?", job.name, step, {}))
    while job.logged.get() != (job.name, step):
        pass  # an answer meant for a worker group that Ray Train has since restarted


def _quiet_report_lines() -> None:
    """Ray Train logs "Reporting training result ..." at INFO for every report, through a logger named by
    its file path (so `LoggingConfig(log_level)` does not reach it): set that one logger to WARNING."""
    import logging

    from ray.train.v2._internal.execution import context
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def _report(stats: dict, step: int, learner, staging: Path | None, rank: int) -> None:
    """`ray.train.report` on every rank; with `staging` (a folder named by `checkpoint_name`), the ranks first
    write one checkpoint there together (the stage folder is shared storage) and rank 0 hands it to Ray Train,
    which copies it into the run under the same name."""
    import ray.train
    from ray.train import Checkpoint
    if staging is None:
        ray.train.report({**stats, "step": step})
        return
    learner.save_checkpoint(staging, {"step": step})
    ray.train.report({**stats, "step": step},
                     checkpoint=Checkpoint.from_directory(str(staging)) if rank == 0 else None,
                     checkpoint_dir_name=staging.name, delete_local_checkpoint_after_upload=rank == 0)


def mean_over_ranks(stats: dict) -> dict:
    """Every rank's statistics gathered, then their rank-mean (`rlhf_ray.dispatch.mean_stats`)."""
    import torch.distributed as dist
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return stats
    keys = sorted(stats)
    mine = torch.tensor([float(stats[k]) for k in keys], dtype=torch.float64)
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, mine)
    return mean_stats([dict(zip(keys, p.tolist())) for p in parts])


def evaluate(learner, data: StageData, eval_fn: Callable, batch_size: int, rank: int, world: int) -> dict:
    """Row-weighted mean of `eval_fn` stats over the eval set (cut to a multiple of the rank count); every
    rank scores its share of each chunk, then the sums meet in one all-reduce."""
    n = len(data.eval) - len(data.eval) % world
    if n == 0:
        return {}
    size = max(world, batch_size - batch_size % world)
    sums: dict[str, float] = {}
    learner.ds_engine.eval()
    with torch.no_grad():
        for i in range(0, n, size):
            chunk = data.eval[i:min(i + size, n)]
            for k, v in eval_fn(learner, split_batch(data.collate(chunk), world)[rank]).items():
                sums[k] = sums.get(k, 0.0) + float(v) * len(chunk)
    means = mean_over_ranks({k: v / n for k, v in sums.items()})
    return {f"eval/{k}": v for k, v in means.items()} | {"eval/rows": float(n)}


def clear_staging(out_dir: Path) -> None:
    shutil.rmtree(out_dir / ".staging", ignore_errors=True)
