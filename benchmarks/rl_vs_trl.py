"""RL step time and reward rise: rlhf_ray GRPO vs TRL's GRPOTrainer, side by side on this machine.

Same model (the quickstart's SFT'd tiny Llama), same prompts, group size 8, 8 prompts per step, 24 new
tokens, temperature 1, constant LR 5e-4, Adam(0.9, 0.999), grad clip 1, KL beta 0.04 as a k3 loss term
(TRL's form), token-mean loss (TRL's default "dapo" aggregation), reward = VADER sentiment of the
completion. Both run one after the other, never together (2 cores).

    python benchmarks/rl_vs_trl.py [--steps 20]      # needs `pip install trl==1.16.0` (make bench does it)

Prints a table and writes benchmarks/results/rl_vs_trl.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
WORK = RESULTS / "work"
PROMPTS, GROUP, NEW_TOKENS, LR, BETA = 8, 8, 24, 5e-4, 0.04
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0",
       "TOKENIZERS_PARALLELISM": "false"}


def cli(*args):
    subprocess.run([sys.executable, "-m", "rlhf_ray.cli", *args], cwd=ROOT, env=ENV, check=True,
                   stdout=subprocess.DEVNULL)


def sft_model() -> Path:
    model = WORK / "sft" / "model"
    if not (model / "COMPLETE").exists():
        cli("train", "configs/quickstart.yaml", f"run.output_dir={WORK}", "run.stages=[sft]")
    return model


def run_ours(model: Path, steps: int, *extra: str) -> dict:
    out = WORK / ("ours-overlap" if extra else "ours")
    t0 = time.time()
    cli("train", "configs/quickstart.yaml", f"run.output_dir={out}", "run.stages=[rl]", f"rl.init_from={model}",
        "reward.sources=[{kind: function, path: 'rlhf_ray.data.builtin_reviews:vader_reward'}]", "reward.gold=null",
        f"rl.steps={steps}", f"rl.prompts_per_step={PROMPTS}", f"rollout.n_samples_per_prompt={GROUP}",
        f"rollout.max_new_tokens={NEW_TOKENS}", "rollout.stop=[]", f"algorithm.mini_batch_size={PROMPTS * GROUP}",
        "algorithm.name=grpo", "algorithm.loss_agg=token-mean", f"reference.kl_coef={BETA}", "reference.kl_kind=k3",
        "reference.kl_in_reward=false", f"rl.policy.optim.lr={LR}", "rl.policy.optim.betas=[0.9, 0.999]",
        f"rl.policy.micro_batch_size={PROMPTS * GROUP}", "rl.save_every=0", "rl.sample_every=0", "logging.report=false",
        *extra)
    total = time.time() - t0
    rows = [json.loads(x) for x in (out / "rl" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    phases = {p: statistics.median(r[f"timing/{p}_s"] for r in rows[1:])
              for p in ("generate", "score", "advantage", "update", "sync", "overhead")}
    phases["overhead_frac"] = statistics.median(r["timing/overhead_frac"] for r in rows[1:])
    return {"step_s": [r["timing/wall_s"] for r in rows], "reward": [r["reward/score_mean"] for r in rows],
            "tokens": [r["response/len_mean"] for r in rows], "phases_median_s": phases, "total_s": total}


TRL_SCRIPT = r"""
import json, sys, time
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import GRPOConfig, GRPOTrainer
from rlhf_ray.data.builtin_reviews import prompt_rows, vader_reward

model_path, steps, out, prompts, group, new_tokens, lr, beta = sys.argv[1:9]
steps, prompts, group, new_tokens, lr, beta = int(steps), int(prompts), int(group), int(new_tokens), float(lr), float(beta)
torch.set_num_threads(2)

def reward(prompts, completions, **kw):
    return vader_reward(prompts, completions)

class Clock(TrainerCallback):
    def __init__(self):
        self.ends = [time.perf_counter()]
    def on_step_end(self, args, state, control, **kw):
        self.ends.append(time.perf_counter())

tok = AutoTokenizer.from_pretrained(model_path)
model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
data = Dataset.from_list([{"prompt": r["prompt"]} for r in prompt_rows(2000)])
cfg = GRPOConfig(output_dir=out, max_steps=steps, per_device_train_batch_size=prompts * group, num_generations=group,
                 max_completion_length=new_tokens, temperature=1.0, learning_rate=lr, lr_scheduler_type="constant",
                 adam_beta2=0.999, max_grad_norm=1.0, beta=beta, logging_steps=1, save_strategy="no", report_to="none",
                 use_cpu=True, bf16=False, seed=0, disable_dropout=True, dataloader_num_workers=0)
clock = Clock()
t0 = time.perf_counter()
trainer = GRPOTrainer(model=model, processing_class=tok, reward_funcs=[reward], args=cfg, train_dataset=data,
                      callbacks=[clock])
t_init = time.perf_counter() - t0
trainer.train()
logs = [h for h in trainer.state.log_history if "reward" in h]
step_s = [b - a for a, b in zip(clock.ends, clock.ends[1:])]
json.dump({"step_s": step_s, "reward": [h["reward"] for h in logs],
           "tokens": [h.get("completions/mean_length", float("nan")) for h in logs],
           "init_s": t_init, "total_s": time.perf_counter() - t0}, open(out + "/trl.json", "w"))
"""


def run_trl(model: Path, steps: int) -> dict:
    out = WORK / "trl"
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    subprocess.run([sys.executable, "-c", TRL_SCRIPT, str(model), str(steps), str(out), str(PROMPTS), str(GROUP),
                    str(NEW_TOKENS), str(LR), str(BETA)], cwd=ROOT, env={**ENV, "OMP_NUM_THREADS": "2"}, check=True,
                   stdout=subprocess.DEVNULL)
    res = json.loads((out / "trl.json").read_text())
    res["total_s"] = time.time() - t0
    return res


def summary(res: dict) -> dict:
    steady = res["step_s"][1:]  # step 1 includes warm-up (first vLLM / HF generate call)
    k = 3
    return {"median_step_s": statistics.median(steady), "mean_step_s": statistics.mean(steady),
            "reward_first3": statistics.mean(res["reward"][:k]), "reward_last3": statistics.mean(res["reward"][-k:]),
            "reward_rise": statistics.mean(res["reward"][-k:]) - statistics.mean(res["reward"][:k]),
            "mean_tokens": statistics.mean(res["tokens"]), "total_s": res["total_s"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    model = sft_model()
    ours = run_ours(model, args.steps)
    overlap = run_ours(model, args.steps, "rollout.sync.max_off_policy_lag=1")
    trl = run_trl(model, args.steps)
    s_ours, s_ovl, s_trl = summary(ours), summary(overlap), summary(trl)
    print(f"{'':24}{'rlhf_ray':>12}{'+overlap':>12}{'TRL 1.16':>12}")
    for key in ("median_step_s", "mean_step_s", "reward_first3", "reward_last3", "reward_rise", "mean_tokens", "total_s"):
        print(f"{key:24}{s_ours[key]:12.3f}{s_ovl[key]:12.3f}{s_trl[key]:12.3f}")
    speedup = {"lockstep": s_trl["median_step_s"] / s_ours["median_step_s"],
               "overlap": s_trl["median_step_s"] / s_ovl["median_step_s"]}
    print(f"speed-up per RL step vs TRL (median): lockstep {speedup['lockstep']:.2f}x, "
          f"overlap (rollouts one version behind) {speedup['overlap']:.2f}x")
    print(f"rlhf_ray phases, median s: lockstep {ours['phases_median_s']}")
    print(f"                           overlap  {overlap['phases_median_s']}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {"setup": {"prompts_per_step": PROMPTS, "group": GROUP, "max_new_tokens": NEW_TOKENS, "lr": LR,
                     "beta": BETA, "steps": args.steps, "model": str(model)},
           "rlhf_ray": {**s_ours, "per_step": ours}, "rlhf_ray_overlap": {**s_ovl, "per_step": overlap},
           "trl": {**s_trl, "per_step": trl}, "speedup": speedup}
    (RESULTS / "rl_vs_trl.json").write_text(json.dumps(out, indent=2))
    print(f"wrote {RESULTS / 'rl_vs_trl.json'}")


if __name__ == "__main__":
    main()
