"""What the benchmarks write beside their timings: the machine (every script `make bench` runs) and each
phase of ours beside TRL's (benchmarks/rl_vs_trl.py, benchmarks/ppo_vs_trl.py). No benchmark is run here."""
import ast
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
import ppo_vs_trl  # noqa: E402
import rl_vs_trl  # noqa: E402
import run_all  # noqa: E402


@pytest.mark.parametrize("name", sorted(run_all.BENCHES))
def test_every_benchmark_records_the_machine_in_its_json(name):
    """The record is measured by rlhf_ray.utils.capability.machine_record and lands in the JSON written."""
    tree = ast.parse((BENCH / run_all.BENCHES[name][0]).read_text())
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "machine_record"]
    assert calls, f"{run_all.BENCHES[name][0]} does not call machine_record"
    keys = [k.value for n in ast.walk(tree) if isinstance(n, ast.Dict) for k in n.keys if isinstance(k, ast.Constant)]
    assert "cpu" in keys  # the JSON's key for the record


def test_the_trl_side_script_parses_and_times_trls_phases():
    tree = ast.parse(rl_vs_trl.TRL_SCRIPT)
    names = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    assert {"_generate", "_generate_and_score_completions"} <= names


def test_the_trl_ppo_script_parses_and_times_trls_phases():
    """TRL 1.12's PPO module-level functions the script wraps (trl/experimental/ppo/ppo_trainer.py): renamed in
    another TRL, the script would time nothing and report its whole step as the update."""
    tree = ast.parse(ppo_vs_trl.TRL_PPO_SCRIPT)
    wrapped = {n.targets[0].attr for n in ast.walk(tree) if isinstance(n, ast.Assign)
               and isinstance(n.targets[0], ast.Attribute) and getattr(n.targets[0].value, "id", None) == "ppo"}
    assert wrapped == {"batch_generation", "forward", "get_reward"}


def test_phase_table_puts_each_of_ours_beside_trl_at_the_same_precision():
    ph = lambda g, s, u, y: {"phases_median_s": {"generate": g, "score": s, "update": u, "sync": y}}  # noqa: E731
    runs = {"colocated": ph(0.29, 0.075, 0.21, 0.01), "colocated_bf16": ph(0.2, 0.05, 0.1, 0.02),
            "trl": ph(0.15, 0.042, 0.144, 0.0), "trl_bf16": {"phases_median_s": None}}
    header, *rows = rl_vs_trl.phase_table(runs)
    assert header.split()[-2:] == ["colocated", "colocated_bf16"]
    assert [r.split() for r in rows] == [["generate", "0.290", "vs", "0.150", "0.200", "vs", "n/a"],
                                         ["score", "0.075", "vs", "0.042", "0.050", "vs", "n/a"],
                                         ["update", "0.210", "vs", "0.144", "0.100", "vs", "n/a"],
                                         ["sync", "0.010", "vs", "0.000", "0.020", "vs", "n/a"]]


def test_learning_over_seeds_averages_each_sides_curves_and_keeps_each_seeds_spread():
    run = lambda reward: {"reward": reward, "step_s": [1.0] * len(reward), "tokens": [1.0] * len(reward), "total_s": 1}
    out = rl_vs_trl.learning_over_seeds({"ours": [run([0, 1, 2, 3, 4, 5]), run([2, 3, 4, 5, 6, 7])]})["ours"]
    assert out["reward_per_step"] == [1, 2, 3, 4, 5, 6]
    assert out["reward_mean"] == 3.5 and out["reward_mean_range"] == [2.5, 4.5]
    assert out["reward_rise"] == 3 and out["reward_rise_range"] == [3, 3]  # last 3 less first 3, each seed
    # the gain: last 3 (4 and 6) less the one start of every run, the mean of their first steps (1)
    assert out["start"] == 1 and out["reward_gain"] == 4 and out["reward_gain_range"] == [3, 5]
    two = rl_vs_trl.learning_over_seeds({"ours": [run([0, 9, 9, 9, 9, 9])], "trl": [run([2, 2, 2, 5, 5, 5])]})
    assert two["ours"]["start"] == two["trl"]["start"] == 1  # pooled over the sides: both start from one policy
    assert (two["ours"]["reward_gain"], two["trl"]["reward_gain"]) == (8, 4)
    assert (two["ours"]["reward_rise"], two["trl"]["reward_rise"]) == (3, 3)  # the rise sees no difference
    assert out["gold_mean"] is None  # runs that logged no gold reward
    assert [r["reward"] for r in out["per_seed"]] == [[0, 1, 2, 3, 4, 5], [2, 3, 4, 5, 6, 7]]
    gold = lambda reward, g: {**run(reward), "gold": g}  # noqa: E731
    out = rl_vs_trl.learning_over_seeds({"trl": [gold([0] * 6, [0.2, 0.4]), gold([0] * 6, [0.6, 0.8])]})["trl"]
    assert out["gold_mean"] == pytest.approx(0.5) and out["gold_mean_range"] == pytest.approx([0.3, 0.7])
    nan = float("nan")  # ours with reward.gold=null logs NaN gold: no gold mean, not a NaN one
    out = rl_vs_trl.learning_over_seeds({"ours": [gold([0] * 6, [nan, nan])]})["ours"]
    assert out["gold_mean"] is None
