"""The driver of the offline stages (SFT, reward model, DPO): one Ray Train job (`TorchTrainer`) whose workers
run `rlhf_ray.offline.worker.train_loop`, and a follower that feeds rank 0's step stats to the progress bars
and our metric sinks.

Consecutive stages that ask for the same workers (ranks, CPUs and GPUs per rank, `max_failures`) run in one
Ray Train run, one stage after the other in the same worker group: `make demo`'s SFT and reward model. A
run's start-up (Ray Train's controller and its helper actors, each a process started one after the other,
then the workers' imports and process group) took 8-11 s of the demo's 80 per stage on a 2-core machine;
the second stage now skips it. Stages asking for different workers get a run each.

Ray Train owns scaling (`ScalingConfig` from the stages' learner section), checkpoints (`RunConfig(name,
storage_path)`: the run folder unless `run.storage_path` names shared storage, `num_to_keep` pruning),
and recovery: `FailureConfig(max_failures)` restarts a failed worker group from the last checkpoint within
a run, and `train --resume` starts the same `RunConfig` again, which Ray Train restores from its snapshot.
A checkpoint's folder names its stage (`rm-step_000040`), so a restored checkpoint resumes only that stage.
"""
from __future__ import annotations

import os
import queue as queue_lib
import shutil
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from rlhf_ray.config.schema import Config, StageConfig
from rlhf_ray.learner.checkpoint import KEEP
from rlhf_ray.offline.data import StageData, plan
from rlhf_ray.offline.metrics import StageLog
from rlhf_ray.offline.worker import StageJob, clear_staging, train_loop

@dataclass(frozen=True)
class StageSpec:
    """One offline stage as `offline.stages` describes it to the driver."""

    name: str                 # "sft" | "rm" | "dpo"
    stage: StageConfig
    kind: str                 # learner kind: "policy" | "reward"
    init_path: str            # absolute (workers run elsewhere); may be an earlier stage's output, written first
    data: StageData
    loss_fn: Callable
    eval_fn: Callable
    out_dir: Path
    setup: Optional[Callable] = None


def workers_of(stage: StageConfig) -> tuple:
    """What a stage asks of its Ray Train workers; stages that ask the same can share a run."""
    learner = stage.learner
    return learner.num_ranks, learner.cpus_per_rank, learner.gpus_per_rank, stage.max_failures


def shares_a_run(stage: StageConfig) -> bool:
    """DeepSpeed 0.19.8's ZeRO-3 engine stays alive after its `destroy` (a reference held where Python's
    collector cannot see it; ZeRO-1/2 and plain engines are freed by `Learner.close`): a ZeRO-3 stage gets
    worker processes of its own rather than leave its model and optimizer beside the next stage's."""
    return stage.learner.deepspeed.zero_stage < 3


def stage_groups(cfg: Config, names: Sequence[str]) -> list[list[str]]:
    """`names` (in run order) cut into runs of consecutive stages that ask for the same workers."""
    groups: list[list[str]] = []
    for name in names:
        stage, last = getattr(cfg, name), getattr(cfg, groups[-1][-1]) if groups else None
        if last is not None and shares_a_run(last) and shares_a_run(stage) and workers_of(last) == workers_of(stage):
            groups[-1].append(name)
        else:
            groups.append([name])
    return groups


def train_run_location(cfg: Config, group: Sequence[str]) -> tuple[str, str]:
    """(storage_path, run name) of a group's Ray Train run: `<storage>/<run.name>-<stage>[+<stage>...]`. The
    name is the whole group's, also when `--resume` has only its later stages left to run."""
    storage = cfg.run.storage_path or cfg.run.output_dir
    return str(Path(storage).resolve()), f"{cfg.run.name}-{'+'.join(group)}"


def run_stages(cfg: Config, group: Sequence[str], specs: Sequence[StageSpec], fresh: bool = False) -> list[Path]:
    """Train, checkpoint, evaluate and export `specs` (the stages of `group` still to run, in order) in one Ray
    Train run; returns their exported HF folders."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.util.queue import Queue

    from rlhf_ray.utils.device import resolve_backend
    storage, run_name = train_run_location(cfg, group)
    if fresh:
        shutil.rmtree(Path(storage) / run_name, ignore_errors=True)
    metrics = Queue(actor_options={"num_cpus": 0})
    logged = Queue(actor_options={"num_cpus": 0})  # the driver's answers: every record up to a step is written
    token = uuid.uuid4().hex  # marks the stages this run finished: a restarted worker group skips them
    jobs = []
    for spec in specs:
        per_epoch, total = plan(spec.name, spec.stage, len(spec.data.train))
        spec.out_dir.mkdir(parents=True, exist_ok=True)
        clear_staging(spec.out_dir)
        jobs.append(StageJob(name=spec.name, cfg=cfg, stage=spec.stage, kind=spec.kind,
                             init_path=spec.init_path,
                             data=spec.data, loss_fn=spec.loss_fn, eval_fn=spec.eval_fn,
                             out_dir=str(spec.out_dir.resolve()), total_steps=total, steps_per_epoch=per_epoch,
                             metrics=metrics, logged=logged, setup=spec.setup, token=token))
    # Ray Train records each run (status, attempts, workers) for Ray's dashboard only when asked; read by
    # the trainer in this driver process. Asked on a cluster, whose dashboard outlives the run. A private
    # local Ray goes down with the run, its dashboard with it, and the record costs an actor (3 of a tiny
    # offline run's 55 CPU-seconds, measured).
    if cfg.cluster.address != "local":
        os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "1")
    first = specs[0].stage
    learner = first.learner
    resources = {"CPU": learner.cpus_per_rank} | ({"GPU": learner.gpus_per_rank} if learner.gpus_per_rank else {})
    trainer = TorchTrainer(
        train_loop, train_loop_config={"jobs": jobs},
        # The device picks the collective backend (gloo on CPU, also when a CPU node advertises logical GPUs).
        torch_config=TorchConfig(backend=resolve_backend(cfg.cluster.device, cfg.model.dtype).dist_backend),
        scaling_config=ScalingConfig(num_workers=learner.num_ranks, use_gpu=learner.gpus_per_rank > 0,
                                     resources_per_worker=resources,
                                     placement_strategy=cfg.cluster.placement_strategy),
        run_config=RunConfig(name=run_name, storage_path=storage,
                             failure_config=FailureConfig(max_failures=first.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=KEEP),
                             # Ray Train's INFO lines (each report, each worker start) would bury the step lines.
                             logging_config=LoggingConfig(log_level="WARNING")))
    by_name = {job.name: job for job in jobs}
    follower = MetricsFollower(metrics, logged, lambda name, start: _logger(by_name[name], cfg, start))
    follower.start()
    try:
        trainer.fit()
    finally:
        follower.stop()
        for spec in specs:
            clear_staging(spec.out_dir)
    return [spec.out_dir / "model" for spec in specs]


def _logger(job: StageJob, cfg: Config, start: int) -> StageLog:
    logger = StageLog(Path(job.out_dir), cfg.logging, total_steps=job.total_steps, start_step=start, title=job.name)
    logger.log(start, {f"data/{k}": float(v) for k, v in job.data.info.items()}
               | {"resumed_from_step": float(start)}, advance=False)
    return logger


class MetricsFollower(threading.Thread):
    """Drains the workers' queue into one `StageLog` per stage. Messages, each naming its stage: ("start",
    stage, step, {}) when a stage (re)starts from `step`; ("step", stage, step, stats); ("final", stage, step,
    held-out stats); ("logged?", stage, step, {}), answered with (stage, step) on `logged` once every record
    before it is written (a worker takes a checkpoint only then). A stage's start closes the one before it (its bar ends, its held-out line prints). A
    restart after a failure rewinds the sinks to the restored step, so every step is logged once."""

    def __init__(self, q, logged, make_logger: Callable[[str, int], StageLog]):
        super().__init__(daemon=True)
        self.q, self.logged, self.make_logger = q, logged, make_logger
        self.loggers: dict[str, StageLog] = {}
        self.finals: dict[str, dict] = {}
        self._open: Optional[str] = None
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self._drain(timeout=0.2)

    def _drain(self, timeout: float | None) -> None:
        from ray.util.queue import Empty
        try:
            kind, stage, step, stats = self.q.get(timeout=timeout) if timeout else self.q.get_nowait()
        except (Empty, queue_lib.Empty):
            return
        if kind == "start":
            if stage != self._open:
                self._close_open()
            if stage not in self.loggers:
                self.loggers[stage] = self.make_logger(stage, step)
            else:  # FailureConfig restarted the worker group from the checkpoint of `step`
                self.loggers[stage].restart(step)
                self.loggers[stage].log(step, {"resumed_from_step": float(step)}, advance=False)
            self._open = stage
        elif kind == "step":
            self.loggers[stage].log(step, stats)
        elif kind == "logged?":  # every record before this one is written (the sinks flush each line)
            self.logged.put((stage, step))
        else:
            self.finals[stage] = stats
            self.loggers[stage].log(step, stats, advance=False)

    def _close_open(self) -> None:
        if self._open is None:
            return
        self.loggers[self._open].close()
        if final := self.finals.get(self._open):
            print(f"{self._open}: held-out " + ", ".join(f"{k.removeprefix('eval/')}={v:.4g}" for k, v in final.items()))
        self._open = None

    def stop(self) -> None:
        """After `fit()`: every put has returned, so what is left in the queue is complete."""
        self._stop_event.set()
        self.join()
        while not self.q.empty():
            self._drain(timeout=None)
        self._close_open()
        import ray
        ray.kill(self.q.actor)
        ray.kill(self.logged.actor)
