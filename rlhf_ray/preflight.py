"""Everything knowable before Ray starts, checked in seconds so that bad input costs no start-up.

    cluster plan       every role placed on the declared cluster (`check_plan`: the plan reads the config;
                       config validation itself never calls the planner)
    model folders      config.json present, architecture known, weights present, tokenizer loads
    LoRA targets       every `model.lora.target_modules` entry names modules of the model (a meta-device
                       model built from config.json: module names without reading a weight)
    RL prompts         the prompt set loads and holds at least `rl.prompts_per_step` prompts
    reward functions   importable, and answering a 2-row probe with 2 finite numbers
    environment        `env.path` loads, and a probe episode on the first prompt row (its tools in this
                       process) answers with usable replies

Each failure is one `PreflightError` line naming the config key and the file or function at fault.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

from rlhf_ray.config import Config
from rlhf_ray.errors import RunError

WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf", "*.safetensors.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "tokenizer_config.json", "sentencepiece.bpe.model")
PROBE_RESPONSES = ("This was a good film.", "I did not like it.")


class PreflightError(RunError, ValueError):
    """Input that cannot work, found before any actor starts; the message names the key and the file."""


def check_plan(cfg: Config) -> None:
    """The RL roles placed on the declared cluster (`cluster.*`): a config that cannot be placed fails now, in one
    line naming the role and what it asks for (`PlanError`), not after an hour of waiting for resources. Memory
    needs model files: `rlhf-ray plan` checks it, and the run places again on the live cluster."""
    from rlhf_ray.placement.plan import place
    place(cfg)


def preflight(cfg: Config, resolve: Optional[Callable[[str], str]] = None, resume: bool = False) -> None:
    """Run every check that applies to the stages `cfg` asks for. `resolve` maps builtin: names and
    paths to folders; `stage:` outputs of this run may not exist yet and are skipped. On `resume`, an
    override the RL checkpoint cannot honour is refused here, not after the offline stages have run."""
    if "rl" in cfg.run.stages:
        check_plan(cfg)
    if resume and "rl" in cfg.run.stages:
        from rlhf_ray.rl.checkpoint import continues_finished
        from rlhf_ray.rl.plateau import resume_changes
        resume_changes(Path(cfg.run.output_dir) / "rl" / "run_config.json", cfg)
        continues_finished(Path(cfg.run.output_dir) / "rl", cfg.rl.steps)  # more steps than it can continue to
    if resolve is None:
        from rlhf_ray.models.kit import resolve_model_path as resolve

    def folder(spec: str, key: str) -> str:
        try:
            return resolve(spec)
        except FileNotFoundError as e:  # the model kit's own words, with the key that named it
            raise PreflightError(f"{key}: {e}") from None

    for key, spec in model_specs(cfg):
        if spec.startswith("stage:"):
            continue
        check_model_folder(folder(spec, key), key)
    policy = _policy_spec(cfg)
    if cfg.model.lora.enabled and not policy.startswith("stage:"):
        check_lora_targets(folder(policy, "model.path"), cfg.model.lora.target_modules)
    if "rl" in cfg.run.stages:
        tok_spec = cfg.model.tokenizer or (policy if not policy.startswith("stage:") else cfg.model.path)
        prompts = check_prompts(cfg, folder(tok_spec, "model.tokenizer" if cfg.model.tokenizer else "model.path"))
        check_reward_functions(cfg, [p.text for p in prompts[:2]])
        if cfg.env.path is not None:
            check_environment(cfg, prompts[0].row)


def check_output_dir(cfg: Config) -> None:
    """`run.output_dir` is a folder this process can create and write in (checked by writing a file there):
    a file in its place, or a place it cannot write, is named with the key before Ray starts."""
    import tempfile
    p = Path(cfg.run.output_dir)
    blocker = next((a for a in (p, *p.parents) if a.exists() and not a.is_dir()), None)
    if blocker == p:
        raise PreflightError(f"run.output_dir: {p} is a file, not a folder; give a folder (or a path that does "
                             f"not exist yet)")
    if blocker is not None:
        raise PreflightError(f"run.output_dir: {p} cannot be created: {blocker} is a file, not a folder")
    try:
        p.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=p):
            pass
    except OSError as e:
        raise PreflightError(f"run.output_dir: {p} cannot be created or written in "
                             f"({e.strerror or type(e).__name__}: {e.filename or p})") from None


def resume_wanted(cfg: Config, mode: Optional[str]) -> bool:
    """`--resume` (mode "required"): there must be something to resume; "auto": resume if there is,
    start fresh if not (a retried job); None: start fresh."""
    if mode is None:
        return False
    found = resume_points(cfg)
    if found or mode == "auto":
        return bool(found)
    raise PreflightError(f"--resume: nothing to resume in {cfg.run.output_dir} (no checkpoint and no finished "
                         f"stage of {', '.join(cfg.run.stages)}); run without --resume to start fresh, or with "
                         f"--resume=auto to start fresh when there is nothing to resume")


def resume_points(cfg: Config) -> list[Path]:
    """Finished stage outputs and checkpoints of a run: RL's own under `<output_dir>/rl/checkpoints`, the
    offline stages' in their Ray Train run folders (`offline.loop.train_run_location`)."""
    from rlhf_ray.learner.checkpoint import complete_checkpoints, is_complete
    from rlhf_ray.offline.loop import stage_groups, train_run_location
    root, out = Path(cfg.run.output_dir), []
    for stage in cfg.run.stages:
        if is_complete(root / stage / "model"):
            out.append(root / stage / "model")
    out += complete_checkpoints(root / "rl" / "checkpoints") if "rl" in cfg.run.stages else []
    for group in stage_groups(cfg, [stage for stage in cfg.run.stages if stage != "rl"]):
        storage, name = train_run_location(cfg, group)
        out += sorted(p for p in (Path(storage) / name).glob("*-step_*") if p.is_dir())
    return out


def _policy_spec(cfg: Config) -> str:
    """The folder the trained policy starts from (its architecture and tokenizer are the base's)."""
    if "sft" in cfg.run.stages:
        return cfg.sft.init_from or cfg.model.path
    return cfg.rl.init_from or cfg.model.path


def model_specs(cfg: Config) -> list[tuple[str, str]]:
    """(config key, model spec) for every model folder the stages will load."""
    stages, out = cfg.run.stages, []
    if "sft" in stages or ("rl" in stages and not cfg.rl.init_from) or ("rm" in stages and not cfg.rm.init_from):
        out.append(("model.path", cfg.model.path))
    for key, spec, on in (("sft.init_from", cfg.sft.init_from, "sft"), ("rm.init_from", cfg.rm.init_from, "rm"),
                          ("rl.init_from", cfg.rl.init_from, "rl")):
        if spec and on in stages:
            out.append((key, spec))
    if "rl" in stages:
        if cfg.reference.path:
            out.append(("reference.path", cfg.reference.path))
        for i, src in enumerate(cfg.reward.sources):
            if src.kind == "model":
                out.append((f"reward.sources[{i}].path", src.path))
    return out


# -- model folders -------------------------------------------------------------------------------
def check_model_folder(path: str, key: str) -> None:
    p = Path(path)
    if not p.is_dir():
        raise PreflightError(f"{key}: {path} is not a folder; give a Hugging Face model folder or a builtin: name")
    if not (p / "config.json").is_file():
        raise PreflightError(f"{key}: the folder {path} holds no model (no config.json); give a Hugging Face "
                             f"model folder (config.json, weights, tokenizer) or a builtin: name")
    _load_config(p, key)
    if not any(next(p.glob(g), None) for g in WEIGHT_FILES):
        raise PreflightError(f"{key}: the folder {path} has a config.json but no weights (*.safetensors or *.bin)")
    if not any((p / f).is_file() for f in TOKENIZER_FILES):
        raise PreflightError(f"{key}: the folder {path} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)})")
    try:
        from transformers import AutoTokenizer
        AutoTokenizer.from_pretrained(str(p))
    except Exception as e:  # noqa: BLE001 - any failure here is the folder's; name it in one line
        raise PreflightError(f"{key}: the tokenizer in {path} does not load: {type(e).__name__}: "
                             f"{_first_line(e)}") from None


def _load_config(p: Path, key: str):
    try:
        raw = json.loads((p / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise PreflightError(f"{key}: {p / 'config.json'} is not valid JSON: {e}") from None
    if raw.get("auto_map"):
        # The folder ships its own Python code; running it means trusting the folder's author.
        raise PreflightError(f"{key}: {p} needs its own Python code (auto_map in config.json); rlhf_ray loads "
                             f"models with trust_remote_code off. Use a model whose architecture transformers has")
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    model_type = raw.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise PreflightError(f"{key}: {p / 'config.json'} names an architecture this transformers does not know "
                             f"(model_type {model_type!r})")
    try:
        return AutoConfig.from_pretrained(str(p))
    except Exception as e:  # noqa: BLE001
        raise PreflightError(f"{key}: {p / 'config.json'} does not load: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# -- LoRA ----------------------------------------------------------------------------------------
def module_names(path: str) -> list[str]:
    """Module names of the model in `path`, from config.json alone: built on the meta device, no weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        try:
            model = AutoModelForCausalLM.from_config(config)
        except ValueError:  # not a causal LM (an encoder reward model): the bare backbone
            from transformers import AutoModel
            model = AutoModel.from_config(config)
    return [name for name, _ in model.named_modules() if name]


def lora_targets_missing(names: list[str], targets: tuple[str, ...]) -> list[str]:
    """The targets that match no module. peft matches a target to a module whose name is the target or
    ends with `.target`."""
    if "all-linear" in targets:
        return []
    return [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]


def check_lora_targets(path: str, targets: tuple[str, ...]) -> None:
    names = module_names(path)
    missing = lora_targets_missing(names, targets)
    if missing:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in names if not n.rsplit(".", 1)[-1].isdigit()})
        raise PreflightError(f"model.lora.target_modules: {', '.join(missing)} not in the model at {path}; "
                             f"its modules are named: {', '.join(leaves)}")


# -- RL prompts and rewards ----------------------------------------------------------------------
def check_prompts(cfg: Config, tokenizer_path: str) -> list:
    from transformers import AutoTokenizer

    from rlhf_ray.data.prompts import load_prompts
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    prompts = load_prompts(cfg.data, tokenizer, cfg.run.seed)  # names a bad row itself
    if cfg.rl.prompts_per_step > len(prompts):
        raise PreflightError(f"rl.prompts_per_step={cfg.rl.prompts_per_step} is more than the {len(prompts)} "
                             f"prompts in data.prompts={cfg.data.prompts}: lower it or give more prompts")
    return prompts


def check_environment(cfg: Config, row: dict) -> None:
    """One probe episode of `env.path` on a real prompt row, with its tools in this process (no Ray yet)."""
    from rlhf_ray.envs.base import EnvError
    from rlhf_ray.envs.loader import probe
    from rlhf_ray.envs.tools import build_tools, limits_of
    tools, _ = build_tools(cfg.env.tools, limits_of(cfg.env), on_ray=False)
    try:
        probe(cfg.env.path, tools, row, cfg.rollout.max_turns)
    except EnvError as e:
        raise PreflightError(f"env.path: {e}" if not str(e).startswith("env.path") else str(e)) from None


def check_reward_functions(cfg: Config, prompts: list[str]) -> None:
    """Import each function source (and `reward.gold`) and call it on a 2-row probe."""
    import math

    from rlhf_ray.roles.reward import FunctionSource
    funcs = [(f"reward.sources[{i}].path", s.path) for i, s in enumerate(cfg.reward.sources) if s.kind == "function"]
    if cfg.reward.gold:
        funcs.append(("reward.gold", cfg.reward.gold))
    prompts = (list(prompts) + ["Write a review:"] * 2)[:2]
    for key, spec in funcs:
        try:
            scores = FunctionSource(spec)(prompts, list(PROBE_RESPONSES))
        except RunError as e:
            raise PreflightError(f"{key}: on a 2-row probe before the run: {e}", detail=e.detail) from None
        bad = [s for s in scores if not math.isfinite(s)]
        if bad and key != "reward.gold" and cfg.reward.on_nonfinite == "error":
            raise PreflightError(f"{key}: reward function {spec} returned {bad[0]} on a 2-row probe before the "
                                 f"run (reward.on_nonfinite=error); return finite numbers")
