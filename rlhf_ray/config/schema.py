"""The typed config tree: one frozen section per role.

pydantic (not dataclasses) because a YAML file arrives as strings and nested dicts: pydantic coerces
and checks types, rejects unknown keys, and reports the exact location of every error, which
`rlhf_ray.config.load` turns into one-paragraph messages. Sections are frozen after validation;
each component receives only its own section (e.g. the generator gets `RolloutConfig`).
"""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


# ---------------------------------------------------------------------------------------------
# model
class LoraConfig(Section):
    enabled: bool = False
    r: int = Field(8, gt=0, description="LoRA rank")
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")


class QuantizationConfig(Section):
    """4-bit NF4 base via bitsandbytes (QLoRA). Only the frozen base is quantized."""

    load_in_4bit: bool = False
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["auto", "float32", "bfloat16"] = "auto"


class ModelConfig(Section):
    """The policy's starting point. `path` is a HF folder or a built-in: `builtin:tiny`, `builtin:smollm2-135m`."""

    path: str = "builtin:tiny"
    tokenizer: Optional[str] = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    gradient_checkpointing: bool = False
    lora: LoraConfig = LoraConfig()
    quantization: QuantizationConfig = QuantizationConfig()

    @model_validator(mode="after")
    def _qlora_needs_lora(self):
        if self.quantization.load_in_4bit and not self.lora.enabled:
            raise ValueError("model.quantization.load_in_4bit=true needs model.lora.enabled=true: "
                             "a 4-bit base cannot be trained directly, only an adapter on top of it")
        return self


# ---------------------------------------------------------------------------------------------
# data
class DataConfig(Section):
    """Datasets: a path (.jsonl, .parquet, a `datasets` folder) or a built-in (`builtin:NAME`)."""

    prompts: str = "builtin:reviews"
    sft: str = "builtin:reviews"
    preferences: str = "builtin:reviews"
    max_prompt_len: int = Field(32, gt=0, description="prompt tokens; longer prompts follow on_long_prompt")
    max_seq_len: int = Field(96, gt=0, description="prompt + response tokens for SFT / RM")
    on_bad_row: Literal["error", "skip"] = "error"
    on_long_prompt: Literal["error", "truncate_left", "skip"] = "truncate_left"
    eval_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    num_samples: int = Field(2000, gt=0, description="rows made by a built-in builder")


# ---------------------------------------------------------------------------------------------
# learner (shared by the SFT, reward-model, policy and critic learners)
class OptimConfig(Section):
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    scheduler: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)


class DeepSpeedConfig(Section):
    zero_stage: Literal[0, 1, 2, 3] = 0
    offload_optimizer: bool = False
    offload_params: bool = False


class LearnerConfig(Section):
    num_ranks: int = Field(1, gt=0)
    micro_batch_size: int = Field(8, gt=0, description="rows per forward/backward; a step's batch is "
                                  "accumulated over as many micro-batches as it takes")
    optim: OptimConfig = OptimConfig()
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    cpus_per_rank: float = Field(1.0, gt=0)
    gpus_per_rank: float = Field(0.0, ge=0)


class StageConfig(Section):
    """An offline stage (SFT or reward model)."""

    enabled: bool = True
    init_from: Optional[str] = Field(None, description="checkpoint to start from; default: the previous stage")
    epochs: int = Field(1, gt=0)
    max_steps: Optional[int] = Field(None, gt=0)
    batch_size: int = Field(16, gt=0)
    save_every: int = Field(0, ge=0, description="steps between resumable checkpoints (0: only at the end)")
    eval_every: int = Field(0, ge=0)
    learner: LearnerConfig = LearnerConfig()
    margin: Optional[float] = Field(None, description="Bradley-Terry margin (reward model only)")


# ---------------------------------------------------------------------------------------------
# rollout (the vLLM generator) and weight sync
class SyncConfig(Section):
    mode: Literal["auto", "full", "adapter"] = "auto"
    bucket_mb: float = Field(64.0, gt=0)
    max_off_policy_lag: int = Field(0, ge=0, description="rollouts may lag the learner by this many versions; "
                                    ">= 1 overlaps the next step's generation with this step's update")
    check_every: int = Field(10, gt=0, description="with overlap, every Nth step runs in lockstep so that "
                                                  "the log-prob agreement check still runs")
    logprob_check: bool = True
    logprob_max_abs_diff: float = Field(0.5, gt=0)
    logprob_mean_abs_diff: float = Field(0.02, gt=0)


class RolloutConfig(Section):
    num_engines: int = Field(1, gt=0)
    tensor_parallel_size: int = Field(1, gt=0)
    n_samples_per_prompt: int = Field(4, gt=0)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1.0)
    max_new_tokens: int = Field(24, gt=0)
    stop: tuple[str, ...] = ()
    seed: Optional[int] = 0
    kv_cache_gib: float = Field(1.0, gt=0, description="CPU KV cache (VLLM_CPU_KVCACHE_SPACE)")
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1.0)
    enforce_eager: bool = True
    on_empty_response: Literal["error", "zero_reward"] = "zero_reward"
    cpus_per_engine: float = Field(1.0, gt=0)
    gpus_per_engine: float = Field(0.0, ge=0)
    sync: SyncConfig = SyncConfig()


# ---------------------------------------------------------------------------------------------
# reward and reference
class RewardSource(Section):
    kind: Literal["model", "function", "http"]
    path: Optional[str] = Field(None, description="model folder (kind=model) or module:function (kind=function)")
    url: Optional[str] = None
    weight: float = 1.0
    timeout_s: float = Field(10.0, gt=0)
    retries: int = Field(2, ge=0)

    @model_validator(mode="after")
    def _target_present(self):
        if self.kind in ("model", "function") and not self.path:
            raise ValueError(f"a reward source of kind '{self.kind}' needs `path`")
        if self.kind == "http" and not self.url:
            raise ValueError("a reward source of kind 'http' needs `url`")
        if self.kind == "function" and ":" not in (self.path or ""):
            raise ValueError(f"kind 'function' needs path as module:function, got {self.path!r}")
        return self


class RewardConfig(Section):
    """Scores are the weighted sum of the sources. `model` path `stage:rm` means the reward model trained in this run."""

    sources: tuple[RewardSource, ...] = (RewardSource(kind="model", path="stage:rm"),)
    on_nonfinite: Literal["error", "zero", "drop_group"] = "error"
    clip: Optional[float] = Field(None, gt=0)
    gold: Optional[str] = Field(None, description="module:function reported as reward/gold_mean, never trained on")
    num_cpus: float = Field(0.5, gt=0)
    num_gpus: float = Field(0.0, ge=0)


class ReferenceConfig(Section):
    """The frozen reference for the KL term. Default: the policy's initial weights (adapter off under LoRA)."""

    path: Optional[str] = None
    kl_coef: float = Field(0.05, ge=0)
    kl_kind: Literal["k1", "k2", "k3"] = "k1"
    kl_in_reward: bool = True
    adaptive_kl: bool = False
    kl_target: float = Field(6.0, gt=0)
    kl_horizon: int = Field(10000, gt=0)
    num_cpus: float = Field(0.5, gt=0, description="the separate reference actor (distributed placement)")
    num_gpus: float = Field(0.0, ge=0, description="the separate reference actor (distributed placement)")


# ---------------------------------------------------------------------------------------------
# algorithm
AlgorithmName = Literal["ppo", "grpo", "dr_grpo", "rloo", "reinforce_pp"]
ADVANTAGE_OF = {"ppo": "gae", "grpo": "grpo", "dr_grpo": "dr_grpo", "rloo": "rloo", "reinforce_pp": "reinforce_pp"}


class AlgorithmConfig(Section):
    name: AlgorithmName = "grpo"
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    clip_low: float = Field(0.2, gt=0)
    clip_high: float = Field(0.2, gt=0)
    dual_clip: Optional[float] = Field(None, gt=1.0)
    value_clip: float = Field(0.2, gt=0)
    loss_agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = "token-mean"
    ppo_epochs: int = Field(1, gt=0)
    mini_batch_size: int = Field(32, gt=0, description="sequences per optimizer step")
    entropy_coef: float = Field(0.0, ge=0)
    value_coef: float = Field(0.5, gt=0)
    whiten_advantages: bool = True
    group_std_norm: bool = True


class RLConfig(Section):
    enabled: bool = True
    init_from: Optional[str] = None
    steps: int = Field(30, gt=0)
    prompts_per_step: int = Field(8, gt=0)
    save_every: int = Field(10, ge=0)
    sample_every: int = Field(5, ge=0)
    policy: LearnerConfig = LearnerConfig(optim=OptimConfig(lr=2e-4))
    critic: LearnerConfig = LearnerConfig(optim=OptimConfig(lr=5e-4))


# ---------------------------------------------------------------------------------------------
# cluster, logging, serve
class ClusterConfig(Section):
    address: str = Field("local", description="'local' starts a Ray on this machine; 'auto' joins; or ray://host:port")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_nodes: int = Field(1, gt=0)
    gpus_per_node: int = Field(0, ge=0)
    gpu_memory_gib: float = Field(0.0, ge=0, description="memory of one GPU; 0: `rlhf-ray plan` skips the check")
    cpu_memory_gib: float = Field(0.0, ge=0, description="host RAM of one node (offloaded optimizer states, "
                                                          "sleeping engines); 0: not checked")
    simulate: bool = Field(False, description="place on logical GPUs (ray.cluster_utils.Cluster nodes) and "
                                              "compute on CPU with gloo: the GPU plan, tested without GPUs")
    cpus_per_node: Optional[int] = Field(None, gt=0)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="offline stages (Ray Train); the RL plan packs each node STRICT_PACK")
    placement: Literal["colocated", "distributed"] = Field(
        "colocated", description="colocated: one process per device holds a policy rank, its engine, critic, "
                                 "reference and reward; distributed: each role in its own actors and GPUs")
    torch_threads: Optional[int] = Field(None, gt=0, description="threads per role; default: cores / busy roles")


class LoggingConfig(Section):
    tensorboard: bool = True
    jsonl: bool = True
    console: bool = True
    wandb_project: Optional[str] = None
    log_every: int = Field(1, gt=0)
    report: bool = True


class ServeConfig(Section):
    model: Optional[str] = Field(None, description="policy folder to serve; default: this run's final policy")
    host: str = "127.0.0.1"
    port: int = Field(8000, gt=0, lt=65536)
    num_replicas: int = Field(1, gt=0)
    max_tokens: int = Field(256, gt=0)
    model_name: str = "rlhf-ray-policy"


class RunConfig(Section):
    name: str = "run"
    output_dir: str = "runs/run"
    seed: int = 0
    stages: tuple[Literal["sft", "rm", "rl"], ...] = ("sft", "rm", "rl")


class Config(Section):
    run: RunConfig = RunConfig()
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    sft: StageConfig = StageConfig()
    rm: StageConfig = StageConfig()
    rollout: RolloutConfig = RolloutConfig()
    reward: RewardConfig = RewardConfig()
    reference: ReferenceConfig = ReferenceConfig()
    algorithm: AlgorithmConfig = AlgorithmConfig()
    rl: RLConfig = RLConfig()
    cluster: ClusterConfig = ClusterConfig()
    logging: LoggingConfig = LoggingConfig()
    serve: ServeConfig = ServeConfig()

    @model_validator(mode="after")
    def _combinations(self):
        q = self.model.quantization
        for where, learner in (("rl.policy", self.rl.policy), ("sft.learner", self.sft.learner),
                               ("rm.learner", self.rm.learner)):
            if q.load_in_4bit and learner.deepspeed.zero_stage == 3:
                raise ValueError(f"model.quantization.load_in_4bit=true cannot be combined with "
                                 f"{where}.deepspeed.zero_stage=3: ZeRO-3 partitions parameters and "
                                 f"bitsandbytes 4-bit weights cannot be partitioned; use zero_stage 0, 1 or 2")
        group_algos = ("grpo", "dr_grpo", "rloo")
        if self.algorithm.name in group_algos and self.rollout.n_samples_per_prompt < 2:
            raise ValueError(f"algorithm.name={self.algorithm.name} compares samples within a group and needs "
                             f"rollout.n_samples_per_prompt >= 2, got {self.rollout.n_samples_per_prompt}")
        batch = self.rl.prompts_per_step * self.rollout.n_samples_per_prompt
        if batch % self.algorithm.mini_batch_size:
            raise ValueError(f"algorithm.mini_batch_size={self.algorithm.mini_batch_size} must divide the rollout "
                             f"batch rl.prompts_per_step x rollout.n_samples_per_prompt = {batch}")
        if self.rollout.sync.mode == "adapter" and not self.model.lora.enabled:
            raise ValueError("rollout.sync.mode=adapter needs model.lora.enabled=true (there is no adapter to send)")
        if self.cluster.device == "cuda" and self.cluster.gpus_per_node == 0:
            raise ValueError("cluster.device=cuda needs cluster.gpus_per_node >= 1")
        if not self.reference.kl_in_reward and self.reference.kl_kind == "k1" and self.reference.kl_coef > 0:
            raise ValueError("reference.kl_in_reward=false puts the KL in the loss, where k1's gradient averages to "
                             "zero on-policy; use reference.kl_kind=k2 or k3 (GRPO uses k3)")
        self._check_gpu_budget()
        if "rl" in self.run.stages and "rm" not in self.run.stages:
            for src in self.reward.sources:
                if src.kind == "model" and src.path == "stage:rm":
                    raise ValueError("reward.sources uses path 'stage:rm' but run.stages has no 'rm' stage; "
                                     "point the source at a trained reward model folder")
        return self

    def _check_gpu_budget(self) -> None:
        """Placement must fit the declared cluster: say so now, not after an hour of waiting for resources.
        The plan owns the counting (rlhf_ray/placement/plan.py); memory needs model files and is checked
        by `rlhf-ray plan` and the run's preflight."""
        from rlhf_ray.placement.plan import place
        place(self)

    @property
    def uses_critic(self) -> bool:
        return self.algorithm.name == "ppo"
