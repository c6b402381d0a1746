"""Simulated GPU clusters: a config's real plan run on this machine, its compute swapped for a tiny model.

    rlhf-ray train configs/gpu/llama3.1-70b-4x8xh100.yaml --simulate

Ray lets a CPU node declare logical GPUs. `simulated_cluster` starts a `ray.cluster_utils.Cluster`: a
CPU-only head node where the driver runs, and `cluster.num_nodes` nodes declaring `cluster.gpus_per_node`
GPUs each. `simulated_config` keeps every key the plan reads (nodes, GPUs, placement, ranks, engines,
tensor-parallel size, every CPU and GPU ask), so the placement groups, bundles and actor-to-node mapping
are the real run's, and swaps what each actor computes: a tiny model of the same family in fp32 on CPU,
gloo collectives (`Plan.simulated`), a few prompts and tokens, 2 steps, one minibatch per step.

What a simulation cannot show, and says so in its banner: GPU memory (that is `rlhf-ray plan`), NCCL,
speed. Facts it relies on (Ray 2.60): an actor that asks for logical GPUs gets CUDA_VISIBLE_DEVICES set
while torch.cuda.is_available() stays false; add_node(num_gpus=8) fails if CUDA_VISIBLE_DEVICES lists
fewer, so it is unset while nodes start.
"""
from __future__ import annotations

import math
import os
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Callable, Iterable

from rlhf_ray.placement.plan import PlanError, place
from rlhf_ray.utils.env import environ_for

if TYPE_CHECKING:
    from rlhf_ray.config import Config

BANNER = ("*** SIMULATION: the plan's placement groups on logical GPUs of a local Ray cluster; every role runs "
          "a tiny model of the same family on CPU (fp32, gloo). No GPU memory, NCCL or speed is tested. ***")

# model_type in config.json -> (tiny causal LM, tiny reward model) of the model kit
TINY_OF_FAMILY = {"llama": ("builtin:tiny", "builtin:tiny-rm")}
# Function reward standing in for reward services the simulation cannot reach (an http source).
STAND_IN_REWARD = "rlhf_ray.data.builtin_reviews:vader_reward"
SIM_STEPS, SIM_SAMPLES, SIM_PROMPT_LEN, SIM_NEW_TOKENS = 2, 2, 16, 8
# Logical CPUs of a simulated GPU node when cluster.cpus_per_node is not declared (the plan then checks none).
NODE_CPUS = 64
# Host RAM of one simulated node's object store: weight buckets of a tiny model (a few MB) and rollouts.
OBJECT_STORE_BYTES = 96 * 2 ** 20


def tiny_twin(spec: str, read_config: Callable[[str], dict], reward: bool = False) -> str:
    """The built-in tiny model of `spec`'s family (its config.json's model_type)."""
    family = read_config(spec).get("model_type", "?")
    if family not in TINY_OF_FAMILY:
        raise PlanError(f"--simulate: no tiny built-in model of the {family!r} family (model {spec}); "
                        f"families with one: {', '.join(sorted(TINY_OF_FAMILY))}")
    return TINY_OF_FAMILY[family][1 if reward else 0]


def batch_shape(cfg: "Config") -> dict[str, int]:
    """The smallest step that still splits evenly over every learner group: one row per rank of the
    largest group, one minibatch per step, one micro-batch per rank."""
    ranks = [cfg.rl.policy.num_ranks] + ([cfg.rl.critic.num_ranks] if cfg.uses_critic else [])
    rows = math.lcm(*ranks)
    prompts = rows // math.gcd(rows, SIM_SAMPLES)
    batch = prompts * SIM_SAMPLES
    return {"prompts": prompts, "batch": batch, "policy_micro": batch // ranks[0],
            "critic_micro": batch // ranks[-1]}


def simulation_updates(cfg: "Config", read_config: Callable[[str], dict]) -> dict[str, Any]:
    """Dotted config keys the simulation changes; none of them is read by `place`."""
    twin = tiny_twin(cfg.model.path, read_config)
    sources = []
    for s in cfg.reward.sources:
        if s.kind == "model":  # `stage:rm` (this run's reward model) starts from model.path's family
            path = cfg.model.path if s.path == "stage:rm" else s.path
            sources.append({"kind": "model", "path": tiny_twin(path, read_config, reward=True), "weight": s.weight})
        elif s.kind == "http":
            sources.append({"kind": "function", "path": STAND_IN_REWARD, "weight": s.weight})
        else:
            sources.append(s.model_dump(mode="json"))
    shape = batch_shape(cfg)
    return {
        "run.stages": ["rl"], "run.output_dir": os.path.join("runs", "simulated", cfg.run.name),
        "model.path": twin, "model.tokenizer": None, "model.dtype": "float32",
        "model.quantization.load_in_4bit": False,  # a GPU memory measure; the twin trains in fp32
        "rollout.quantization": "auto",  # online fp8 is CUDA-only: the twin's engine loads fp32
        "reference.path": tiny_twin(cfg.reference.path, read_config) if cfg.reference.path else None,
        "reward.sources": sources, "reward.gold": None,
        "data.prompts": "builtin:reviews", "data.max_prompt_len": SIM_PROMPT_LEN,
        "rollout.n_samples_per_prompt": SIM_SAMPLES, "rollout.max_new_tokens": SIM_NEW_TOKENS,
        "rollout.kv_cache_gib": 1, "rollout.sync.bucket_mb": 1,  # several buckets even for a tiny model
        "rollout.enforce_eager": True,  # two steps of the twin: a compile at each engine's start would not pay
        "algorithm.mini_batch_size": shape["batch"], "algorithm.ppo_epochs": 1,
        "algorithm.dynamic_sampling": False,
        "rl.init_from": None, "rl.critic_init_from": None,
        "rl.steps": SIM_STEPS, "rl.prompts_per_step": shape["prompts"], "rl.save_every": 0, "rl.sample_every": 0,
        "rl.eval_every": 0,
        "rl.policy.micro_batch_size": shape["policy_micro"], "rl.critic.micro_batch_size": shape["critic_micro"],
        # DeepSpeed's CPU Adam for offloaded states is a compiled op; the tiny twin needs no offload
        "rl.policy.deepspeed.offload_optimizer": False, "rl.policy.deepspeed.offload_params": False,
        "rl.critic.deepspeed.offload_optimizer": False, "rl.critic.deepspeed.offload_params": False,
        "cluster.simulate": True, "cluster.torch_threads": 1,
        "logging.tensorboard": False, "logging.report": False, "logging.wandb_project": None,
    }


def simulated_config(cfg: "Config", overrides: Iterable[str] = (),
                     read_config: Callable[[str], dict] | None = None) -> "Config":
    """`cfg` with its compute swapped for the simulation; the operator's own `overrides` still win."""
    from rlhf_ray.config.load import apply_override, set_dotted, validate
    if read_config is None:
        from rlhf_ray.placement.report import model_config as read_config
    raw = cfg.model_dump(mode="json")
    for key, value in simulation_updates(cfg, read_config).items():
        set_dotted(raw, key.split("."), value)
    for item in overrides:
        apply_override(raw, item)
    sim = validate(raw, source=f"the simulation of {cfg.run.name}")
    if place(sim).bundles != place(cfg, simulate=True).bundles:  # a user override changed the plan itself
        raise PlanError("--simulate: the simulated config no longer places like the real one; override only "
                        "keys the plan does not read (model, data, steps), not cluster or role sizes")
    return sim


@contextmanager
def simulated_cluster(cluster_cfg, init_kwargs: dict):
    """A local multi-node Ray cluster shaped like `cluster_cfg` (the config's `cluster` section), this
    process connected to its CPU-only head; everything it started is stopped on exit."""
    import ray
    from ray.cluster_utils import Cluster

    with environ_for(CUDA_VISIBLE_DEVICES=None):
        cluster = Cluster(initialize_head=True, head_node_args=dict(
            num_cpus=1, num_gpus=0, include_dashboard=False, object_store_memory=OBJECT_STORE_BYTES))
        try:
            for _ in range(cluster_cfg.num_nodes):
                cluster.add_node(num_cpus=cluster_cfg.cpus_per_node or NODE_CPUS,
                                 num_gpus=cluster_cfg.gpus_per_node, object_store_memory=OBJECT_STORE_BYTES)
            cluster.wait_for_nodes()
            ray.init(address=cluster.address, **init_kwargs)
            yield cluster
        finally:
            ray.shutdown()
            cluster.shutdown()
