"""PPO step time and learning: rlhf_ray PPO vs TRL's PPOTrainer, side by side on this machine (one run after the
other, never two at once), on the tiny task.

Both sides start from the same models, trained here once by our pipeline (configs/quickstart.yaml on
builtin:tiny-3m): the SFT policy, and the Bradley-Terry reward model, which scores every sample on both sides and
starts both critics (InstructGPT's critic-from-RM; TRL's examples do the same). Per step, both: 32 prompts x 1
sample x 32 new tokens at temperature 1, stopped at EOS; k1 KL in the reward, beta 0.05 (TRL's default); GAE
gamma 1, lambda 0.95; advantages whitened over the batch; 4 PPO epochs of one minibatch of 32; ratio clip 0.2,
value clip 0.2; Adam(0.9, 0.999) at the same constant LR for policy and critic; fp32; 2 torch threads.
Reward rise is the mean reward-model score of the last steps less the first (the same model on both sides).

TRL 1.16 has no PPO trainer: the TRL side is TRL 1.12's `trl.experimental.ppo.PPOTrainer`, installed on first
use into benchmarks/results/work/trl-1.12.0 (`pip install --no-deps --target`) and put on that process's path
alone.

    python benchmarks/ppo_vs_trl.py [--steps 20] [--lr 5e-4] [--seeds 1]

Prints the machine (rlhf_ray.utils.capability.machine_record), both sides' step time, reward rise and phases
(generate, score, update), and writes benchmarks/results/ppo_vs_trl.json. `--seeds N` runs both sides again
with seeds 1 .. N-1 (prompt order and sampling: our `run.seed`, TRL's `seed`) and compares their learning over
all N: one seed's curve is one draw of the samples, and its first steps decide most of a rise.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rl_vs_trl import (RESULTS, VADER, WORK, cli, learning_over_seeds, phase_table, prompt_texts,  # noqa: E402
                       print_learning, run_trl_script, summary, train_ours)

TRL_VERSION = "1.12.0"
CASE = dict(model="builtin:tiny-3m", prompts="builtin:reviews", prompt_len=16, n_prompts=32, new_tokens=32,
            ppo_epochs=4, beta=0.05)


def models() -> tuple[str, str]:
    """The SFT policy and the reward model both sides start from, trained once (stages sft, rm)."""
    root = WORK / "tiny-ppo"
    sft, rm = root / "sft" / "model", root / "rm" / "model"
    if not ((sft / "COMPLETE").exists() and (rm / "COMPLETE").exists()):
        cli("train", "configs/quickstart.yaml", f"run.output_dir={root}", "run.stages=[sft, rm]",
            f"model.path={CASE['model']}")
    return str(sft), str(rm)


def trl_path() -> str:
    """A folder holding TRL 1.12 alone (no dependencies: the installed TRL 1.16's serve it)."""
    target = WORK / f"trl-{TRL_VERSION}"
    if not (target / "trl" / "experimental" / "ppo").is_dir():
        print(f"installing trl=={TRL_VERSION} into {target} (its PPOTrainer; TRL 1.16 has none)")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                        f"trl=={TRL_VERSION}"], check=True)
    return str(target)


def run_ours(policy: str, rm: str, steps: int, lr: float, seed: int = 0) -> dict:
    n = CASE["n_prompts"]
    return train_ours(WORK / "tiny-ppo" / f"ours{seed or ''}", f"rl.init_from={policy}", f"run.seed={seed}",
                      f"data.prompts={CASE['prompts']}",
                      f"data.max_prompt_len={CASE['prompt_len']}", f"reward.sources=[{{kind: model, path: '{rm}'}}]",
                      f"reward.gold={VADER}", "cluster.placement=colocated", "rollout.threads=1",
                      f"rl.steps={steps}", f"rl.prompts_per_step={n}", "rollout.n_samples_per_prompt=1",
                      f"rollout.max_new_tokens={CASE['new_tokens']}", "rollout.stop=[]", "rollout.temperature=1.0",
                      "algorithm.name=ppo", f"algorithm.ppo_epochs={CASE['ppo_epochs']}",
                      f"algorithm.mini_batch_size={n}", "algorithm.loss_agg=token-mean", "algorithm.gamma=1.0",
                      "algorithm.lam=0.95", f"reference.kl_coef={CASE['beta']}", "reference.kl_kind=k1",
                      "reference.kl_in_reward=true", f"rl.critic_init_from={rm}",
                      f"rl.policy.optim.lr={lr}", f"rl.critic.optim.lr={lr}", "rl.policy.optim.betas=[0.9, 0.999]",
                      "rl.critic.optim.betas=[0.9, 0.999]", f"rl.policy.micro_batch_size={n}",
                      f"rl.critic.micro_batch_size={n}")


TRL_PPO_SCRIPT = r"""
import json, sys, time
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
import trl.experimental.ppo.ppo_trainer as ppo
from trl.experimental.ppo import PPOConfig, PPOTrainer

a = json.loads(sys.argv[1])
torch.set_num_threads(2)
tok = AutoTokenizer.from_pretrained(a["policy"], padding_side="left")
rows = [{"input_ids": tok(p, add_special_tokens=False)["input_ids"][-a["prompt_len"]:]} for p in a["prompts"]]
load = lambda cls, path, **kw: cls.from_pretrained(path, dtype=torch.float32, **kw)

# Per step: seconds in HF generate (TRL's `batch_generation`), in its no-grad forwards of the rollout (reference
# and old log-probs, values, rewards: `forward` and `get_reward` without grad), the rest is the PPO update.
spent, phases, ends, tokens, gold = {"generate": 0.0, "score": 0.0, "gold": 0.0}, [], [time.perf_counter()], [], []
def timed(name, fn, only_no_grad=False):
    def run(*args, **kw):
        if only_no_grad and torch.is_grad_enabled():
            return fn(*args, **kw)
        t0 = time.perf_counter()
        try:
            return fn(*args, **kw)
        finally:
            spent[name] += time.perf_counter() - t0
    return run
generate = ppo.batch_generation
def generate_counted(model, queries, *args, **kw):
    out = timed("generate", generate)(model, queries, *args, **kw)
    resp = out[0][:, queries.shape[1]:]
    after_eos = (resp == tok.eos_token_id).cumsum(1) > 0  # the first EOS and what follows it
    length = resp.shape[1] - after_eos.sum(1) + after_eos.any(1).long()  # up to and with the EOS
    tokens.append(length.float().mean().item())
    timed("gold", score_gold)(queries, resp, after_eos)
    return out
# the gold reward of what was sampled, up to the EOS: VADER sentiment, what our side logs as reward/gold_mean
# (timed apart, so that TRL's update is not charged for it)
def score_gold(queries, resp, after_eos):
    from rlhf_ray.data.builtin_reviews import vader_reward
    texts = [tok.decode(r[~e], skip_special_tokens=True) for r, e in zip(resp, after_eos)]
    gold.append(sum(vader_reward(tok.batch_decode(queries, skip_special_tokens=True), texts)) / len(texts))
ppo.batch_generation = generate_counted
ppo.forward = timed("score", ppo.forward, only_no_grad=True)
ppo.get_reward = timed("score", ppo.get_reward, only_no_grad=True)

class Clock(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        ends.append(time.perf_counter())
        phases.append(dict(spent)); spent.update(generate=0.0, score=0.0, gold=0.0)

n = a["n_prompts"]
cfg = PPOConfig(output_dir=a["out"], total_episodes=a["steps"] * n, per_device_train_batch_size=n,
                num_mini_batches=1, gradient_accumulation_steps=1, local_rollout_forward_batch_size=n,
                num_ppo_epochs=a["ppo_epochs"], response_length=a["new_tokens"], temperature=1.0, stop_token="eos",
                kl_coef=a["beta"], kl_estimator="k1", cliprange=0.2, cliprange_value=0.2, gamma=1.0, lam=0.95,
                whiten_rewards=False, learning_rate=a["lr"], lr_scheduler_type="constant", adam_beta2=0.999,
                max_grad_norm=1.0, num_sample_generations=0, logging_steps=1, save_strategy="no", report_to="none",
                use_cpu=True, seed=a["seed"], dataloader_num_workers=0)
t0 = time.perf_counter()
trainer = PPOTrainer(args=cfg, processing_class=tok, model=load(AutoModelForCausalLM, a["policy"]),
                     ref_model=load(AutoModelForCausalLM, a["policy"]),
                     reward_model=load(AutoModelForSequenceClassification, a["rm"], num_labels=1),
                     value_model=load(AutoModelForSequenceClassification, a["rm"], num_labels=1),
                     train_dataset=Dataset.from_list(rows), callbacks=[Clock()])
t_init = time.perf_counter() - t0
trainer.train()
logs = [h for h in trainer.state.log_history if "objective/scores" in h]
step_s = [b - a for a, b in zip(ends, ends[1:])]
json.dump({"step_s": step_s, "reward": [h["objective/scores"] for h in logs], "kl": [h["objective/kl"] for h in logs],
           "approx_kl": [h.get("policy/approxkl_avg") for h in logs],
           "clip_frac": [h.get("policy/clipfrac_avg") for h in logs],
           "tokens": tokens, "gold": gold, "init_s": t_init, "total_s": time.perf_counter() - t0,
           "phases": [{"generate": p["generate"], "score": p["score"],
                       "update": s - p["generate"] - p["score"] - p["gold"], "sync": 0.0} for p, s in zip(phases, step_s)]},
          open(a["out"] + "/trl.json", "w"))
"""


def run_trl(policy: str, rm: str, steps: int, lr: float, seed: int = 0) -> dict:
    args = dict(policy=policy, rm=rm, steps=steps, lr=lr, prompts=prompt_texts(CASE, 2000), seed=seed,
                **{k: CASE[k] for k in ("prompt_len", "n_prompts", "new_tokens", "ppo_epochs", "beta")})
    return run_trl_script(TRL_PPO_SCRIPT, WORK / "tiny-ppo" / "trl", args, pythonpath=trl_path())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--seeds", type=int, default=1, help="compare learning over this many seeds (see above)")
    args = ap.parse_args()
    from rlhf_ray.utils.capability import describe, machine_record
    cpu = machine_record(2)  # measured before anything else runs
    print(describe(cpu))
    policy, rm = models()
    runs = {"colocated": run_ours(policy, rm, args.steps, args.lr), "trl": run_trl(policy, rm, args.steps, args.lr)}
    s = {k: summary(v) for k, v in runs.items()}
    print(f"\n== tiny PPO: {args.steps} steps, {CASE['n_prompts']} prompts x {CASE['new_tokens']} tokens, "
          f"{CASE['ppo_epochs']} epochs, LR {args.lr}")
    print(f"{'':18}{'ours':>16}{'TRL ' + TRL_VERSION:>16}")
    for key in ("median_step_s", "mean_step_s", "reward_first", "reward_last", "reward_rise", "reward_mean",
                "mean_tokens", "total_s"):
        print(f"{key:18}{s['colocated'][key]:16.3f}{s['trl'][key]:16.3f}")
    speedup = s["trl"]["median_step_s"] / s["colocated"]["median_step_s"]
    print(f"speed-up per step vs TRL (median): {speedup:.2f}x")
    print("\n".join(phase_table(runs)) + "   (ours vs TRL)")
    out = {"cpu": cpu, "setup": {**CASE, "steps": args.steps, "lr": args.lr, "trl": TRL_VERSION,
                                     "policy": policy, "reward_model": rm, "seeds": args.seeds},
           **{k: {**s[k], "per_step": runs[k]} for k in runs}, "speedup": speedup}
    if args.seeds > 1:
        per_seed = {"colocated": [runs["colocated"]], "trl": [runs["trl"]]}
        for seed in range(1, args.seeds):
            per_seed["colocated"].append(run_ours(policy, rm, args.steps, args.lr, seed))
            per_seed["trl"].append(run_trl(policy, rm, args.steps, args.lr, seed))
        out["seeds"] = learning_over_seeds(per_seed)
        print_learning(out["seeds"], args.seeds, {"colocated": "ours", "trl": "TRL " + TRL_VERSION})
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "ppo_vs_trl.json"
    path.write_text(json.dumps(out, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
