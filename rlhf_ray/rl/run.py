"""The RL stage: build the actor graph, run the controller, checkpoint, log, export the final policy.

Layout of `out_dir`:
    checkpoints/step_000010/{policy,critic}   resumable state (atomic, COMPLETE marker)
    metrics.jsonl, tensorboard/, samples.jsonl, report.png, report.md
    model/                                    the trained policy, HF format (LoRA merged)
    adapter/                                  under LoRA: the adapter alone (peft format, base = the init model)
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Callable

from rlhf_ray.config import Config
from rlhf_ray.envs.episode import EpisodeRunner
from rlhf_ray.errors import describe_failure
from rlhf_ray.learner.checkpoint import is_complete, latest_checkpoint
from rlhf_ray.placement.groups import release, reserve
from rlhf_ray.rl import checkpoint as rl_checkpoint
from rlhf_ray.rl.controller import RLController, StepConfig
from rlhf_ray.rl.evaluation import Evaluator, format_eval, split_prompts
from rlhf_ray.rl.plateau import PlateauDetector, check_resume_overrides
from rlhf_ray.rl.prompt_stream import PromptStream
from rlhf_ray.placement.groups import check_fits
from rlhf_ray.placement.graph import build_roles
from rlhf_ray.placement.shared import Paths
from rlhf_ray.roles.reward import FunctionSource
from rlhf_ray.tracking.console import ConsoleView
from rlhf_ray.tracking.metrics import MetricsLogger
from rlhf_ray.tracking.report import write_report


def run_rl(cfg: Config, policy_init: str, resolve: Callable[[str], str], out_dir: str | Path,
           resume: bool = False) -> Path:
    from rlhf_ray.data.encode import decode_responses
    from rlhf_ray.data.prompts import load_prompts
    from transformers import AutoTokenizer

    out = Path(out_dir)
    final = out / "model"
    if resume and is_complete(final) and not rl_checkpoint.continues_finished(out, cfg.rl.steps):
        return final  # finished, and no more steps asked for (read before the new config is recorded below)
    changed = check_resume_overrides(out / "run_config.json", cfg, resume)  # unsafe changes refused by name
    out.mkdir(parents=True, exist_ok=True)
    if not resume:  # a fresh run must never resume from an older run's checkpoints later
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    init_path = resolve(policy_init)
    tokenizer = AutoTokenizer.from_pretrained(init_path)
    prompts = load_prompts(cfg.data, tokenizer, cfg.run.seed)  # validated before any actor starts
    prompts, held_out = split_prompts(prompts, cfg)
    gold = FunctionSource(cfg.reward.gold) if cfg.reward.gold else None
    # The plan on the live cluster owns every ask: each role's bundle, node, device, dtype and dist backend.
    # The driver never looks at its own node (a CPU-only head node drives a GPU run).
    plan = check_fits(cfg)
    groups = reserve(plan)
    total_updates = cfg.rl.steps * _updates_per_step(cfg)
    try:
        roles = build_roles(cfg, Paths(init_path, resolve, str(out / "scratch")), plan, groups, total_updates)
    except Exception as e:  # noqa: BLE001 - an actor that failed to start: one line naming it
        release(groups)
        raise describe_failure(e, 0) from None
    tool_actors: list = []
    controller = None
    try:
        episodes, tool_actors = episode_runner(cfg, tokenizer)
        stream = PromptStream(prompts, cfg.rl.prompts_per_step, cfg.run.seed)
        controller = RLController(StepConfig.of(cfg), roles, stream, pad_id=tokenizer.pad_token_id,
                                  dtypes=roles.args.sync.agreement_precisions,  # fp8 engines: fp8's row
                                  episodes=episodes, decode=lambda ids: decode_responses(tokenizer, ids))
        restored = rl_checkpoint.load(roles, out / "checkpoints", note=print) if resume else None
        ckpt = restored[0] if restored else None
        if restored:
            controller.load_state_dict(restored[1])  # the engines serve the restored weights from here
        logger = MetricsLogger(out, cfg.logging, "rl", cfg.model_dump(mode="json"), resume=ckpt is not None)
        if ckpt is not None:
            logger.truncate_to(controller.step_idx)
        evaluator = Evaluator(held_out, cfg, tokenizer.pad_token_id, gold, episodes)
        plateau = PlateauDetector(cfg)
        eval_gen = roles.sample
        with ConsoleView(cfg.rl.steps, f"rl:{cfg.algorithm.name}", cfg.logging.console,
                         start=controller.step_idx) as view:
            if ckpt is not None:
                view.note(f"resumed from {ckpt} at step {controller.step_idx}"
                          + (f" with {', '.join(changed)} changed" if changed else ""))
            if controller.step_idx == 0 and evaluator.due(0):  # the baseline every later evaluation is read against
                logger.log(0, base := evaluator.run(eval_gen, roles.score, 0))
                view.note(format_eval(0, base))
            last = time.perf_counter()
            while controller.step_idx < cfg.rl.steps:
                try:
                    result = controller.step()
                except Exception as e:  # noqa: BLE001 - whatever an actor raised: role, step, cause in one line
                    good = latest_checkpoint(out / "checkpoints")
                    raise _logged(describe_failure(e, controller.step_idx + 1, actor_names(roles),
                                                   str(good) if good else None), e, out) from None
                step = controller.step_idx
                if gold is not None:
                    result.metrics["reward/gold_mean"] = _mean(gold(result.prompts, result.responses))
                now = time.perf_counter()
                if evaluator.due(step):
                    result.metrics.update(evaluator.run(eval_gen, roles.score, step))
                    view.note(format_eval(step, result.metrics))
                if (line := plateau.update(step, result.metrics)) is not None:
                    view.note(line)
                result.metrics["timing/wall_s"] = now - last  # the step plus everything between steps
                last = now
                logger.log(step, result.metrics)
                view.step(step, result.metrics)
                if cfg.rl.sample_every and step % cfg.rl.sample_every == 0:
                    logger.log_samples(step, result.prompts[:4], result.responses[:4], result.scores[:4],
                                       result.episodes[:4])
                # the last step too: `--resume` with a larger rl.steps continues a finished stage from it
                if cfg.rl.save_every and (step % cfg.rl.save_every == 0 or step == cfg.rl.steps):
                    rl_checkpoint.save(roles, out / "checkpoints", step, controller.state_dict())
        controller.close()  # async: the producer stops sampling before the export reads the weights
        logger.close()
        if cfg.model.lora.enabled:  # the adapter alone too: megabytes, to serve on the same base
            roles.export(str(out / "adapter"), merge_lora=False)
        roles.export(str(final), merge_lora=True)
    finally:
        if controller is not None:
            controller.close()
        if tool_actors:
            import ray
            for actor in tool_actors:
                ray.kill(actor)
        roles.shutdown()
        release(groups)
    if cfg.logging.report:
        write_report(out, f"{cfg.run.name}: {cfg.algorithm.name}")
    return final


def episode_runner(cfg: Config, tokenizer) -> tuple[EpisodeRunner | None, list]:
    """With `env.path`: the episode runner (its environment's tools as Ray actors) and those actors; else
    (None, []). Observations are tokenized alone, without the BOS a tokenizer may add to a text's start."""
    if cfg.env.path is None:
        return None, []
    from rlhf_ray.envs.loader import env_factory
    from rlhf_ray.envs.tools import build_tools, limits_of
    tools, actors = build_tools(cfg.env.tools, limits_of(cfg.env), on_ray=True)
    runner = EpisodeRunner(env_factory(cfg.env.path, tools),
                           lambda text: tokenizer(text, add_special_tokens=False)["input_ids"],
                           lambda ids: tokenizer.decode(ids, skip_special_tokens=False),
                           max_turns=cfg.rollout.max_turns, budget=cfg.rollout.max_new_tokens,
                           template=cfg.env.observation_template,
                           max_observation_tokens=cfg.env.max_observation_tokens,
                           max_turn_tokens=cfg.env.max_turn_tokens, name=cfg.env.path)
    return runner, actors


def _logged(err, exc: BaseException, out: Path):
    """The full trace (Ray's included) goes to `error.log` for a bug report; the console gets one line."""
    import traceback
    path = out / "error.log"
    path.write_text("".join(traceback.format_exception(exc)))
    if not err.detail:
        err.detail = f"  (full trace: {path})"
    return err


def actor_names(roles) -> dict[str, str]:
    """Actor id (hex) -> the name an operator knows it by, for errors that say which process died."""
    return {actor._actor_id.hex(): name for name, actor in roles.processes()}


def _updates_per_step(cfg: Config) -> int:
    batch = cfg.rl.prompts_per_step * cfg.rollout.n_samples_per_prompt
    return cfg.algorithm.ppo_epochs * max(1, batch // cfg.algorithm.mini_batch_size)


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")

