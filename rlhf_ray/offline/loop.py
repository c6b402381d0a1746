"""The driver of an offline stage (SFT, reward model, DPO): one Ray Train job (`TorchTrainer`) whose workers
run `rlhf_ray.offline.worker.train_loop`, and a follower that feeds rank 0's step stats to the progress bar
and our metric sinks.

Ray Train owns scaling (`ScalingConfig` from the stage's learner section), checkpoints (`RunConfig(name,
storage_path)`: the run folder unless `run.storage_path` names shared storage, `num_to_keep` pruning),
and recovery: `FailureConfig(max_failures)` restarts a failed worker group from the last checkpoint within
a run, and `train --resume` starts the same `RunConfig` again, which Ray Train restores from its snapshot.
"""
from __future__ import annotations

import os
import queue as queue_lib
import shutil
import threading
from pathlib import Path
from typing import Callable

from rlhf_ray.config.schema import Config, StageConfig
from rlhf_ray.offline.data import StageData, plan
from rlhf_ray.offline.metrics import StageLog
from rlhf_ray.offline.worker import StageJob, clear_staging, train_loop

KEEP_CHECKPOINTS = 2


def train_run_location(cfg: Config, name: str) -> tuple[str, str]:
    """(storage_path, run name) of a stage's Ray Train run: `<storage>/<run.name>-<stage>`."""
    storage = cfg.run.storage_path or cfg.run.output_dir
    return str(Path(storage).resolve()), f"{cfg.run.name}-{name}"


def run_stage(name: str, cfg: Config, stage: StageConfig, *, kind: str, init_path: str, data: StageData,
              loss_fn: Callable, eval_fn: Callable, out_dir: Path, fresh: bool = False,
              setup: Callable | None = None) -> Path:
    """Train, checkpoint, evaluate and export one offline stage on Ray Train; returns the exported HF folder."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.util.queue import Queue

    from rlhf_ray.models.kit import resolve_model_path
    from rlhf_ray.utils.device import resolve_backend
    init_path = resolve_model_path(init_path)  # here, where a relative path means what the user meant
    per_epoch, total = plan(name, stage, len(data.train))
    storage, run_name = train_run_location(cfg, name)
    out_dir.mkdir(parents=True, exist_ok=True)
    clear_staging(out_dir)
    if fresh:
        shutil.rmtree(Path(storage) / run_name, ignore_errors=True)
    metrics = Queue(actor_options={"num_cpus": 0})
    job = StageJob(name=name, cfg=cfg, stage=stage, kind=kind, init_path=init_path, data=data, loss_fn=loss_fn,
                   eval_fn=eval_fn, out_dir=str(out_dir.resolve()), total_steps=total, steps_per_epoch=per_epoch,
                   metrics=metrics, setup=setup)
    # Ray Train records each run (status, attempts, workers) for Ray's dashboard only when asked; read by
    # the trainer in this driver process.
    os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "1")
    learner = stage.learner
    resources = {"CPU": learner.cpus_per_rank} | ({"GPU": learner.gpus_per_rank} if learner.gpus_per_rank else {})
    trainer = TorchTrainer(
        train_loop, train_loop_config={"job": job},
        # The device picks the collective backend (gloo on CPU, also when a CPU node advertises logical GPUs).
        torch_config=TorchConfig(backend=resolve_backend(cfg.cluster.device, cfg.model.dtype).dist_backend),
        scaling_config=ScalingConfig(num_workers=learner.num_ranks, use_gpu=learner.gpus_per_rank > 0,
                                     resources_per_worker=resources,
                                     placement_strategy=cfg.cluster.placement_strategy),
        run_config=RunConfig(name=run_name, storage_path=storage,
                             failure_config=FailureConfig(max_failures=stage.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=KEEP_CHECKPOINTS),
                             # Ray Train's INFO lines (each report, each worker start) would bury the step lines.
                             logging_config=LoggingConfig(log_level="WARNING")))
    follower = MetricsFollower(metrics, lambda start: _logger(name, cfg, data, out_dir, total, start))
    follower.start()
    try:
        trainer.fit()
    finally:
        follower.stop()
        clear_staging(out_dir)
    return out_dir / "model"


def _logger(name: str, cfg: Config, data: StageData, out_dir: Path, total: int, start: int) -> StageLog:
    logger = StageLog(out_dir, cfg.logging, total_steps=total, start_step=start, title=name)
    logger.log(start, {f"data/{k}": float(v) for k, v in data.info.items()} | {"resumed_from_step": float(start)},
               advance=False)
    return logger


class MetricsFollower(threading.Thread):
    """Drains the workers' queue into a `StageLog`. Messages: ("start", step, {}) when a worker group
    (re)starts from `step`; ("step", step, stats); ("final", step, held-out stats). A restart after a
    failure rewinds the sinks to the restored step, so every step is logged once."""

    def __init__(self, q, make_logger: Callable[[int], StageLog]):
        super().__init__(daemon=True)
        self.q, self.make_logger = q, make_logger
        self.logger: StageLog | None = None
        self.final: dict = {}
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self._drain(timeout=0.2)

    def _drain(self, timeout: float | None) -> None:
        from ray.util.queue import Empty
        try:
            kind, step, stats = self.q.get(timeout=timeout) if timeout else self.q.get_nowait()
        except (Empty, queue_lib.Empty):
            return
        if kind == "start":
            if self.logger is None:
                self.logger = self.make_logger(step)
            else:  # FailureConfig restarted the worker group from the checkpoint of `step`
                self.logger.restart(step)
                self.logger.log(step, {"resumed_from_step": float(step)}, advance=False)
        elif kind == "step":
            self.logger.log(step, stats)
        else:
            self.final = stats
            self.logger.log(step, stats, advance=False)

    def stop(self) -> None:
        """After `fit()`: every put has returned, so what is left in the queue is complete."""
        self._stop_event.set()
        self.join()
        while not self.q.empty():
            self._drain(timeout=None)
        if self.logger:
            self.logger.close()
        if self.final:
            print(f"{self.logger.title}: held-out " +
                  ", ".join(f"{k.removeprefix('eval/')}={v:.4g}" for k, v in self.final.items()))
        import ray
        ray.kill(self.q.actor)
