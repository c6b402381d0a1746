"""Learning on a real model: rlhf_ray PPO and GRPO beside TRL's GRPOTrainer, at equal samples.

SmolLM2-135M-Instruct with LoRA (r=16) continues IMDB movie-review openers (`builtin:movie-reviews`);
the reward model is MiniLM-L6 trained here on the built-in preference pairs (`builtin:reviews`, which the
VADER judge labelled); VADER itself is the independent gold judge, never trained on. Every run sees the
same number of samples per step (prompts x group) and the same number of steps, one run at a time.

    python benchmarks/learning_bench.py [--steps 20] [--prompts 4 --group 4 --new-tokens 48] [--lr 1e-4]
    # TRL: `pip install trl==1.16.0` (make bench does it). The committed results: --steps 40 --new-tokens 24
    # --lr 5e-4 (640 samples a run; 10-25 minutes a run on 2 shared CPU cores: the step times there are
    # not a speed measurement, benchmarks/rl_vs_trl.py is). At --lr 1e-4 and 10 steps nothing moved.

Both GRPO implementations put a k3 KL in the loss with beta 0.04 and normalise rewards by the group's std;
TRL 1.16 reduces the loss over all tokens of the batch (its default loss_type "dapo") where rlhf_ray's grpo
averages per sequence first (Shao 2024), and its AdamW runs betas (0.9, 0.999) against our (0.9, 0.95).
rlhf_ray's PPO puts a k1 KL in the reward and trains a critic from the policy's weights.

Writes benchmarks/results/learning_bench.json (reward, gold and KL per step against samples seen, wall
time) and benchmarks/results/learning_bench.png.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from rlhf_ray.utils.capability import describe, machine_record

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
WORK = RESULTS / "work" / "learning"
CONFIG = "configs/cpu/smollm2-reviews-lora.yaml"
PROMPTS, GROUP, NEW_TOKENS, LR, BETA = 4, 4, 48, 1e-4, 0.04
GOLD = "rlhf_ray.data.builtin_reviews:vader_reward"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0",
       "TOKENIZERS_PARALLELISM": "false"}


def cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "rlhf_ray.cli", "train", CONFIG, *args], cwd=ROOT, env=ENV, check=True,
                   stdout=subprocess.DEVNULL)


def reward_model() -> Path:
    """MiniLM-L6 with a scalar head, Bradley-Terry on the built-in pairs (its own tokenizer, no LoRA)."""
    out = WORK / "rm"
    if not (out / "rm" / "model" / "COMPLETE").exists():
        cli(f"run.output_dir={out}", "run.stages=[rm]", "rm.init_from=builtin:minilm-rm", "model.lora.enabled=false", "rollout.sync.mode=auto",
            "data.preferences=builtin:reviews", "data.max_seq_len=96", "rm.epochs=1", "rm.batch_size=32",
            "rm.learner.optim.lr=5e-5", "rm.learner.micro_batch_size=32")
    return out / "rm" / "model"


def run_ours(algo: str, rm: Path, steps: int) -> dict:
    out = WORK / f"ours-{algo}"
    done = out / "bench_result.json"  # a finished run of this size is reused when another run failed
    size = {"steps": steps, "prompts": PROMPTS, "group": GROUP, "new_tokens": NEW_TOKENS, "lr": LR, "beta": BETA}
    if done.exists() and json.loads(done.read_text())["size"] == size:
        return json.loads(done.read_text())["result"]
    t0 = time.time()
    cli(f"run.output_dir={out}", "run.stages=[rl]", f"algorithm.name={algo}", f"rl.steps={steps}",
        f"reward.sources=[{{kind: model, path: '{rm}'}}]", f"reward.gold={GOLD}", f"rl.prompts_per_step={PROMPTS}",
        f"rollout.n_samples_per_prompt={GROUP}", f"rollout.max_new_tokens={NEW_TOKENS}",
        f"algorithm.mini_batch_size={PROMPTS * GROUP}", f"reference.kl_coef={BETA}", f"rl.policy.optim.lr={LR}",
        "rl.save_every=0", "logging.report=false")
    rows = [json.loads(x) for x in (out / "rl" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    rows = [r for r in rows if "reward/score_mean" in r]
    result = {"reward": [r["reward/score_mean"] for r in rows], "gold": [r["reward/gold_mean"] for r in rows],
              "kl": [r["kl/mean"] for r in rows], "step_s": [r["timing/wall_s"] for r in rows],
              "total_s": time.time() - t0}
    done.write_text(json.dumps({"size": size, "result": result}))
    return result


TRL_SCRIPT = r"""
import json, sys, time
import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import GRPOConfig, GRPOTrainer
from rlhf_ray.config import load_config
from rlhf_ray.data.builtin_reviews import vader_reward
from rlhf_ray.data.sources import load_rows
from rlhf_ray.models.kit import resolve_model_path
from rlhf_ray.roles.reward import ModelSource

rm_path, steps, out, prompts, group, new_tokens, lr, beta, config = sys.argv[1:10]
steps, prompts, group, new_tokens = int(steps), int(prompts), int(group), int(new_tokens)
lr, beta = float(lr), float(beta)
torch.set_num_threads(2)
cfg = load_config(config, [])
rm = ModelSource(rm_path)

def texts(prompts, completions):          # conversational rows: the user turn and the assistant's reply
    return [p[-1]["content"] for p in prompts], [c[-1]["content"] for c in completions]

def reward(prompts, completions, **kw):   # the same scorer, the same encoding as rlhf_ray's reward role
    return rm(*texts(prompts, completions))

def gold(prompts, completions, **kw):     # weight 0: logged, never trained on
    return vader_reward(*texts(prompts, completions))

class Clock(TrainerCallback):
    def __init__(self):
        self.ends = [time.perf_counter()]
    def on_step_end(self, args, state, control, **kw):
        self.ends.append(time.perf_counter())

path = resolve_model_path(cfg.model.path)
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
rows, _ = load_rows(cfg.data.prompts, "prompts", cfg.data, cfg.run.seed)
# rlhf_ray renders each prompt as a user turn through the model's chat template; so does TRL with messages
data = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}]} for r in rows])
lora = LoraConfig(r=cfg.model.lora.r, lora_alpha=cfg.model.lora.alpha, task_type="CAUSAL_LM",
                  target_modules=list(cfg.model.lora.target_modules))
args = GRPOConfig(output_dir=out, max_steps=steps, per_device_train_batch_size=prompts * group, num_generations=group,
                  max_completion_length=new_tokens, temperature=cfg.rollout.temperature, learning_rate=lr,
                  lr_scheduler_type="constant", max_grad_norm=1.0, beta=beta, logging_steps=1, save_strategy="no",
                  report_to="none", use_cpu=True, bf16=False, seed=0, reward_weights=[1.0, 0.0],
                  dataloader_num_workers=0)
clock = Clock()
t0 = time.perf_counter()
trainer = GRPOTrainer(model=model, processing_class=tok, reward_funcs=[reward, gold], args=args, train_dataset=data,
                      peft_config=lora, callbacks=[clock])
trainer.train()
logs = [h for h in trainer.state.log_history if "reward" in h]
json.dump({"reward": [h["rewards/reward/mean"] for h in logs], "gold": [h["rewards/gold/mean"] for h in logs],
           "kl": [h.get("kl", float("nan")) for h in logs],
           "step_s": [b - a for a, b in zip(clock.ends, clock.ends[1:])], "total_s": time.perf_counter() - t0},
          open(out + "/trl.json", "w"))
"""


def run_trl(rm: Path, steps: int) -> dict:
    out = WORK / "trl"
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    subprocess.run([sys.executable, "-c", TRL_SCRIPT, str(rm), str(steps), str(out), str(PROMPTS), str(GROUP),
                    str(NEW_TOKENS), str(LR), str(BETA), CONFIG], cwd=ROOT, env={**ENV, "OMP_NUM_THREADS": "2"},
                   check=True, stdout=subprocess.DEVNULL)
    res = json.loads((out / "trl.json").read_text())
    res["total_s"] = time.time() - t0
    return res


def summary(res: dict) -> dict:
    """First and last quarter of the run (at least 3 steps each): one step's 16 samples are noisy."""
    k = max(3, len(res["reward"]) // 4)
    mean = (lambda xs: sum(xs) / len(xs))
    # the whole run's mean: the area under the curve per sample, i.e. how fast reward rose along the way
    return {"reward_mean": mean(res["reward"]), "gold_mean": mean(res["gold"]),
            "reward_first": mean(res["reward"][:k]), "reward_last": mean(res["reward"][-k:]),
            "gold_first": mean(res["gold"][:k]), "gold_last": mean(res["gold"][-k:]),
            "kl_last": mean(res["kl"][-k:]), "total_s": res["total_s"]}


def plot(runs: dict[str, dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    for name, res in runs.items():
        samples = [PROMPTS * GROUP * (i + 1) for i in range(len(res["reward"]))]
        for ax, key in zip(axes, ("reward", "gold", "kl")):
            ax.plot(samples, res[key], marker=".", label=name)
    for ax, title in zip(axes, ("reward model score", "gold (VADER, held out of training)", "KL to reference")):
        ax.set_title(title)
        ax.set_xlabel("samples")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    global PROMPTS, GROUP, NEW_TOKENS, LR, BETA  # one size for every run of this invocation
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--prompts", type=int, default=PROMPTS, help="prompts per step")
    ap.add_argument("--group", type=int, default=GROUP, help="samples per prompt")
    ap.add_argument("--new-tokens", type=int, default=NEW_TOKENS, help="max response tokens")
    ap.add_argument("--lr", type=float, default=LR, help="policy learning rate (LoRA), both sides")
    ap.add_argument("--beta", type=float, default=BETA, help="KL coefficient, both sides")
    ap.add_argument("--skip-trl", action="store_true", help="only rlhf_ray's runs (TRL not installed)")
    args = ap.parse_args()
    PROMPTS, GROUP, NEW_TOKENS, LR, BETA = args.prompts, args.group, args.new_tokens, args.lr, args.beta
    cpu = machine_record(2)
    print(describe(cpu), flush=True)
    rm = reward_model()
    runs = {"rlhf_ray ppo": run_ours("ppo", rm, args.steps), "rlhf_ray grpo": run_ours("grpo", rm, args.steps)}
    if not args.skip_trl:
        runs["TRL 1.16 GRPOTrainer"] = run_trl(rm, args.steps)
    sums = {name: summary(res) for name, res in runs.items()}
    keys = list(next(iter(sums.values())))
    print(f"{'':24}" + "".join(f"{n:>24}" for n in sums))
    for key in keys:
        print(f"{key:24}" + "".join(f"{s[key]:24.3f}" for s in sums.values()))
    RESULTS.mkdir(parents=True, exist_ok=True)
    setup = {"model": "SmolLM2-135M-Instruct LoRA r16", "reward_model": "MiniLM-L6 (Bradley-Terry, builtin:reviews)",
             "gold": "VADER", "prompts_per_step": PROMPTS, "group": GROUP, "samples_per_step": PROMPTS * GROUP,
             "max_new_tokens": NEW_TOKENS, "lr": LR, "beta": BETA, "steps": args.steps}
    (RESULTS / "learning_bench.json").write_text(json.dumps(
        {"setup": setup, "cpu": cpu, "summary": sums, "per_step": runs}, indent=2))
    plot(runs, RESULTS / "learning_bench.png")
    print(f"wrote {RESULTS / 'learning_bench.json'} and learning_bench.png")


if __name__ == "__main__":
    main()
