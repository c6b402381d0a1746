"""The typed config tree: one frozen section per role.

pydantic (not dataclasses) because a YAML file arrives as strings and nested dicts: pydantic coerces
and checks types, rejects unknown keys, and reports the exact location of every error, which
`rlhf_ray.config.load` turns into one-paragraph messages. Sections are frozen after validation;
each component receives only its own section (e.g. the generator gets `RolloutConfig`).
"""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, PrivateAttr, model_validator

from rlhf_ray.algo.registry import IS_CORRECTIONS, get_algorithm
from rlhf_ray.config.section import Section
from rlhf_ray.config.serve import ServeConfig


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
    dtype: Literal["auto", "measure", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto (= measure): bf16 on a GPU; on CPU, bf16 where its GEMM measured at least 2x "
        "fp32's (AVX-512 BF16, AMX; rlhf_ray.utils.capability, once per machine; env RLHF_RAY_CPU_DTYPE "
        "overrides), else fp32")
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
    rl_eval_prompts: int = Field(32, gt=0, description="RL prompts held out for rl.eval_every (only when it is on)")


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
    max_tokens_per_micro_batch: Optional[int] = Field(
        None, gt=0, description="RL learners (rl.policy, rl.critic): micro-batches by this many padded tokens "
        "(rows x (longest prompt + longest response)) instead of micro_batch_size rows, each prompt's samples kept "
        "together and the longest responses batched with each other; the same objective up to float rounding")
    optim: OptimConfig = OptimConfig()
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    cpus_per_rank: float = Field(1.0, gt=0)
    gpus_per_rank: float = Field(0.0, ge=0)
    on_nonfinite: Literal["stop", "skip"] = Field("stop", description="a NaN/inf loss or gradient: stop the run "
                                                  "naming the step, or skip the step and count it")


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
    max_failures: int = Field(1, ge=0, description="Ray Train restarts of a failed worker group (from the last "
                              "checkpoint) before the stage fails")
    margin: Optional[float] = Field(None, description="Bradley-Terry margin (reward model only)")


class DPOConfig(StageConfig):
    """The DPO stage: preference pairs, a frozen reference (the adapter off under LoRA, else a frozen copy of
    the starting model). Default start: this run's SFT model when the run has an SFT stage."""

    beta: float = Field(0.1, gt=0, description="strength of the implicit KL constraint to the reference")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="assumed rate of flipped preference labels "
                                   "(conservative DPO); 0 is plain DPO")


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
    on_logprob_mismatch: Literal["fail", "correct"] = Field(
        "fail", description="a lockstep step whose learner-vs-generator log-probs differ beyond the thresholds below: "
        "fail the step naming the numbers, or go on with algorithm.is_correction's preset weighing the gap out "
        "(the step logs sync/logprob_over_bound=1 and says so on the console)")
    logprob_max_abs_diff: Optional[float] = Field(None, gt=0, description="default: per compute precision "
                                                  "(rlhf_ray.utils.device.LOGPROB_TOLERANCE: fp32 0.5, bf16 4.0)")
    logprob_mean_abs_diff: Optional[float] = Field(None, gt=0, description="default: per compute precision "
                                                   "(fp32 0.02, bf16 0.15)")
    logprob_precision: Literal["auto", "float32", "bfloat16", "float16", "fp8"] = Field(
        "auto", description="the precision whose row of LOGPROB_TOLERANCE sets the unset thresholds; auto: the "
                            "loosest of what the learner and the engine compute in (an fp8 engine: fp8's, docs/GPU.md)")


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
    enforce_eager: Optional[bool] = Field(None, description="decode eager; default: vLLM's own, compiled (CUDA "
                                          "graphs on a GPU; on a CPU a torch.compile at the engine's start, 10-30 "
                                          "s, for 11-32% less decode time; a CPU engine with LoRA stays eager)")
    kv_block_size: Optional[int] = Field(None, gt=0, multiple_of=16,
                                         description="tokens per KV-cache block; default: by device (32 on CPU, "
                                                     "vLLM's own on a GPU). A group's samples share their "
                                                     "prompt's full blocks: its prefill runs once")
    quantization: Literal["auto", "none", "fp8_per_tensor", "fp8_per_channel"] = Field(
        "auto", description="the engine's online weight quantization (vLLM 0.32 names); auto: fp8_per_tensor for a "
                            "4-bit policy on a GPU (vLLM has no NF4), none otherwise. fp8_per_channel needs SM89+")
    on_empty_response: Literal["error", "zero_reward"] = "zero_reward"
    cpus_per_engine: float = Field(1.0, gt=0, description="Ray CPUs of a distributed engine actor")
    gpus_per_engine: float = Field(0.0, ge=0)
    threads: Optional[int] = Field(None, gt=0, description="CPU threads while generating (colocated); "
                                   "default: all of the worker's. Tiny models decode faster on one")
    max_turns: int = Field(1, gt=0, description="policy turns per episode with an environment (env.path); "
                           "max_new_tokens then bounds the whole episode after the prompt, the environment's "
                           "tokens included")
    mode: Literal["lockstep", "async"] = Field(
        "lockstep", description="lockstep: each step samples, then trains (with sync.max_off_policy_lag=1 the next "
        "step is sampled beside the update); async: a driver thread keeps sampling batches into a buffer bounded so "
        "that no batch trains more than sync.max_off_policy_lag versions behind the learner (rlhf_ray.rl.producer)")
    partial: bool = Field(False, description="async only: a weight push lands between chunks of partial_chunk_tokens "
                          "tokens of an in-flight batch, whose sequences continue under the new weights; every token "
                          "keeps the version and log-prob it was sampled with (Rollout.response_versions)")
    partial_chunk_tokens: int = Field(8, gt=0, description="tokens each sequence samples per engine call with "
                                      "rollout.partial (the longest a weight push waits for a generation)")
    sync: SyncConfig = SyncConfig()


class EnvConfig(Section):
    """A multi-turn environment (`rlhf_ray.envs`): each episode starts from a prompt row, the policy and the
    environment take turns (a tool result, a user turn, or done with a reward) up to rollout.max_turns."""

    path: Optional[str] = Field(None, description="builtin:arith, builtin:code, or module:Class; None: single-turn "
                                "rollouts scored by reward.sources alone")
    tools: tuple[Literal["calculator", "python"], ...] = Field(
        ("calculator",), description="tools the environment may call, each a Ray actor (in-process before Ray)")
    observation_template: str = Field(
        "\n<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n",
        description="how an environment reply is written after the policy's turn ({text}: the reply); "
                    "tokenized alone and appended, never the whole conversation again")
    max_observation_tokens: int = Field(64, gt=0, description="an environment reply longer than this is cut")
    max_turn_tokens: Optional[int] = Field(None, gt=0, description="tokens one policy turn may sample at most "
                                           "(default: what is left of rollout.max_new_tokens)")
    tool_timeout_s: float = Field(2.0, gt=0, description="wall-clock limit of one tool call (CPU limit too)")
    tool_memory_mb: int = Field(256, gt=0, description="address-space limit of the Python executor's process")
    tool_output_bytes: int = Field(2048, gt=0, description="a tool's output beyond this is cut and marked")
    reward_weight: float = Field(1.0, description="the environment's episode reward enters the score with this "
                                 "weight, added to reward.sources")


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
    max_tokens_per_micro_batch: Optional[int] = Field(None, gt=0, description="reward models (kind=model): score "
                                                      "rows packed by this many padded tokens, longest first, "
                                                      "instead of the plan's row count")


class ReferenceConfig(Section):
    """The frozen reference for the KL term. Default: the policy's initial weights (adapter off under LoRA)."""

    path: Optional[str] = None
    kl_coef: float = Field(0.05, ge=0)
    kl_kind: Optional[Literal["k1", "k2", "k3"]] = Field(None, description="default: the algorithm's")
    kl_in_reward: Optional[bool] = Field(None, description="KL in the reward (true) or in the loss (false); "
                                         "default: the algorithm's (rlhf_ray.algo.registry)")
    adaptive_kl: bool = False
    kl_target: float = Field(6.0, gt=0)
    kl_horizon: int = Field(10000, gt=0)
    num_cpus: float = Field(0.5, gt=0, description="the separate reference actor (distributed placement)")
    num_gpus: float = Field(0.0, ge=0, description="the separate reference actor (distributed placement)")
    max_tokens_per_micro_batch: Optional[int] = Field(None, gt=0, description="the separate reference scorer's "
                                                      "micro-batches by this many padded tokens (see rl.policy's)")


# ---------------------------------------------------------------------------------------------
# algorithm
# The names of rlhf_ray.algo.registry.ALGORITHMS (a test keeps the two equal); each name brings its own
# estimator, loss aggregation and KL placement, which the fields left unset below take.
AlgorithmName = Literal["ppo", "grpo", "dr_grpo", "rloo", "reinforce_pp", "dapo", "gspo", "cispo"]


# algorithm.tis (a boolean before the presets) and algorithm.tis_cap keep working as aliases
_TIS_ALIAS = {True: "tis", False: "none", "auto": "auto"}


class AlgorithmConfig(Section):
    @model_validator(mode="before")
    @classmethod
    def _tis_alias(cls, data):
        """`algorithm.tis: true|false|auto` -> is_correction tis|none|auto; `tis_cap` -> is_cap. Given both ways
        with different values, the config is refused naming both keys."""
        if not isinstance(data, dict) or not ({"tis", "tis_cap"} & set(data)):
            return data
        data = dict(data)
        if "tis" in data:
            tis = data.pop("tis")
            if isinstance(tis, str) and tis.lower() in ("true", "false", "on", "off", "yes", "no"):
                tis = tis.lower() in ("true", "on", "yes")
            if not (isinstance(tis, bool) or tis == "auto"):
                raise ValueError(f"algorithm.tis must be true, false or auto (an alias of algorithm.is_correction "
                                 f"tis, none, auto), got {tis!r}")
            if data.get("is_correction", _TIS_ALIAS[tis]) != _TIS_ALIAS[tis]:
                raise ValueError(f"algorithm.tis={str(tis).lower()} (an alias of algorithm.is_correction="
                                 f"{_TIS_ALIAS[tis]}) contradicts algorithm.is_correction={data['is_correction']}; "
                                 f"set only algorithm.is_correction")
            data["is_correction"] = _TIS_ALIAS[tis]
        if "tis_cap" in data:
            cap = data.pop("tis_cap")
            if "is_cap" in data and data["is_cap"] != cap:
                raise ValueError(f"algorithm.tis_cap={cap} (an alias of algorithm.is_cap) contradicts "
                                 f"algorithm.is_cap={data['is_cap']}; set only algorithm.is_cap")
            data["is_cap"] = cap
        return data

    name: AlgorithmName = "grpo"
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    clip_low: float = Field(0.2, gt=0, description="the ratio's range is [1 - clip_low, 1 + clip_high]; gspo: its "
                            "sequence ratio's (3e-4 / 4e-4), cispo: its IS weight's (1.0: no lower bound / 0.28)")
    clip_high: float = Field(0.2, gt=0)
    dual_clip: Optional[float] = Field(None, gt=1.0)
    value_clip: float = Field(0.2, gt=0)
    loss_agg: Optional[Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]] = Field(
        None, description="default: the algorithm's (Dr. GRPO: seq-mean-token-sum-norm)")
    ppo_epochs: int = Field(1, gt=0)
    mini_batch_size: int = Field(32, gt=0, description="sequences per optimizer step")
    entropy_coef: float = Field(0.0, ge=0)
    value_coef: float = Field(0.5, gt=0)
    whiten_advantages: bool = True
    group_std_norm: bool = True
    baseline: Optional[Literal["group_mean"]] = Field(None, description="reinforce_pp only: group_mean is "
                                                      "REINFORCE++-baseline (needs n_samples_per_prompt >= 2)")
    is_correction: Literal["auto", "none", "tis", "mis", "icepop", "seq_mask_tis"] = Field(
        "auto", description="train/inference mismatch correction between the learner's and the generator's "
        "log-probs (rlhf_ray.algo.offpolicy): tis truncates token ratios at is_cap, mis drops sequences whose "
        "ratio passes is_cap, icepop drops tokens outside [is_low, is_high], seq_mask_tis drops sequences whose "
        "geometric-mean ratio is outside [is_low, is_high] and truncates the rest at is_cap; auto: tis when "
        "rollout.sync.max_off_policy_lag >= 1 (or a measured bf16 CPU), else none. Alias: algorithm.tis")
    is_cap: float = Field(2.0, ge=1.0, description="C of tis, mis and seq_mask_tis. Alias: algorithm.tis_cap")
    is_low: Optional[float] = Field(None, gt=0, description="lower end of the band of icepop / seq_mask_tis; "
                                    "default: the preset's (icepop 0.5, seq_mask_tis 0.5)")
    is_high: Optional[float] = Field(None, gt=0, description="upper end of the band of icepop / seq_mask_tis; "
                                     "default: the preset's (icepop 5.0, seq_mask_tis 2.0)")
    dynamic_sampling: bool = Field(False, description="DAPO: drop groups whose rewards are all equal and sample "
                                   "more prompts until the batch is full")
    dynamic_sampling_max_rounds: int = Field(3, ge=0, description="extra generation rounds per step at most")
    overlong_buffer: int = Field(0, ge=0, description="DAPO soft overlong penalty: the last N tokens before "
                                 "rollout.max_new_tokens ramp the reward down by up to overlong_penalty (0: off)")
    overlong_penalty: float = Field(1.0, ge=0)


class RLConfig(Section):
    enabled: bool = True
    init_from: Optional[str] = None
    steps: int = Field(30, gt=0)
    prompts_per_step: int = Field(8, gt=0)
    save_every: int = Field(10, ge=0)
    sample_every: int = Field(5, ge=0)
    eval_every: int = Field(0, ge=0, description="steps between evaluations on data.rl_eval_prompts held-out "
                            "prompts, greedy and sampled (0: off)")
    eval_samples: int = Field(2, gt=0, description="sampled responses per held-out prompt (plus one greedy)")
    plateau_window: int = Field(10, ge=0, description="steps without a new best moving-average reward before "
                                "the console says reward has plateaued (0: off)")
    plateau_smoothing: int = Field(5, gt=0, description="steps in the reward's moving average")
    plateau_min_delta: float = Field(0.01, ge=0, description="improvement that counts as one")
    critic_init_from: Optional[str] = Field(None, description="PPO critic start: `stage:rm` or a reward-model "
                                            "folder (InstructGPT); default: the policy's initial weights")
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


class RunConfig(Section):
    name: str = "run"
    output_dir: str = "runs/run"
    seed: int = 0
    stages: tuple[Literal["sft", "rm", "dpo", "rl"], ...] = Field(
        ("sft", "rm", "rl"), description="stages to run, always in the order sft, rm, dpo, rl")
    storage_path: Optional[str] = Field(None, description="where Ray Train keeps offline-stage checkpoints "
                                        "(shared storage on a multi-node cluster); default: output_dir")


class Config(Section):
    run: RunConfig = RunConfig()
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    sft: StageConfig = StageConfig()
    rm: StageConfig = StageConfig()
    dpo: DPOConfig = DPOConfig()
    rollout: RolloutConfig = RolloutConfig()
    reward: RewardConfig = RewardConfig()
    env: EnvConfig = EnvConfig()
    reference: ReferenceConfig = ReferenceConfig()
    algorithm: AlgorithmConfig = AlgorithmConfig()
    rl: RLConfig = RLConfig()
    cluster: ClusterConfig = ClusterConfig()
    logging: LoggingConfig = LoggingConfig()
    serve: ServeConfig = ServeConfig()
    # the CPU dtype `_measured_dtype` decided for model.dtype auto/measure (None: configured or left to the plan);
    # `rlhf-ray train` names it in one line when it is bf16
    _measured: Optional[str] = PrivateAttr(None)

    @property
    def computes_on_cpu(self) -> bool:
        """The roles compute on CPUs: a CPU device asked for, or auto on nodes without GPUs."""
        c = self.cluster
        return c.device == "cpu" or (c.device == "auto" and c.gpus_per_node == 0)

    @model_validator(mode="after")
    def _measured_dtype(self):
        """model.dtype auto or measure: decided here, once, so every role and `rlhf-ray config` read one dtype.
        CPU roles get `cpu_default_dtype()`, from a measured GEMM probe rather than the CPU's name (on a 2-core
        AMD EPYC with AVX-512 BF16, bf16 GEMM 4.5x fp32, a SmolLM2 LoRA GRPO step ran 2x faster in bf16); with
        bf16 their engine and learner log-probs round apart (max 0.66 on SmolLM2,
        rlhf_ray.utils.device.LOGPROB_TOLERANCE), so an unset algorithm.is_correction is tis. GPU: auto (bf16)."""
        if self.model.dtype not in ("auto", "measure"):
            return self
        from rlhf_ray.utils.capability import cpu_default_dtype
        c = self.cluster
        # a simulated GPU cluster computes on CPU too, but keeps its plan's dtype unless measure is asked for
        measured = self.computes_on_cpu or (c.simulate and self.model.dtype == "measure")
        dtype = cpu_default_dtype() if measured else "auto"
        object.__setattr__(self, "model", self.model.model_copy(update={"dtype": dtype}))
        if measured:
            self._measured = dtype
        if dtype == "bfloat16" and self.algorithm.is_correction == "auto":
            object.__setattr__(self, "algorithm", self.algorithm.model_copy(update={"is_correction": "tis"}))
        return self

    @model_validator(mode="after")
    def _algorithm_defaults(self):
        """Fill what the config left unset from the algorithm's registry entry, so every component reads
        one resolved value (and `rlhf-ray config` prints it)."""
        spec = get_algorithm(self.algorithm.name)
        unset = set(AlgorithmConfig.model_fields) - self.algorithm.model_fields_set
        algo = {k: v for k, v in spec.defaults.items() if k in unset}
        if "overlong_buffer" in unset and spec.overlong_fraction > 0:
            algo["overlong_buffer"] = max(1, round(spec.overlong_fraction * self.rollout.max_new_tokens))
        if self.algorithm.loss_agg is None:
            algo["loss_agg"] = spec.loss_agg
        if algo:
            object.__setattr__(self, "algorithm", self.algorithm.model_copy(update=algo))
        ref = {k: v for k, v in (("kl_in_reward", spec.kl_in_reward), ("kl_kind", spec.kl_kind))
               if getattr(self.reference, k) is None}
        if ref:
            object.__setattr__(self, "reference", self.reference.model_copy(update=ref))
        if self.algorithm.is_correction == "auto":  # rollouts that may lag the learner need the correction
            kind = "tis" if self.rollout.sync.max_off_policy_lag >= 1 else "none"
            object.__setattr__(self, "algorithm", self.algorithm.model_copy(update={"is_correction": kind}))
        band = IS_CORRECTIONS[self.algorithm.is_correction]
        if band is not None:  # the preset's band where the config leaves it unset, so every role reads one value
            lo, hi = self.algorithm.is_low or band[0], self.algorithm.is_high or band[1]
            object.__setattr__(self, "algorithm", self.algorithm.model_copy(update={"is_low": lo, "is_high": hi}))
        return self

    @model_validator(mode="after")
    def _combinations(self):
        q = self.model.quantization
        for where, learner in (("rl.policy", self.rl.policy), ("sft.learner", self.sft.learner),
                               ("rm.learner", self.rm.learner), ("dpo.learner", self.dpo.learner)):
            if q.load_in_4bit and learner.deepspeed.zero_stage == 3:
                raise ValueError(f"model.quantization.load_in_4bit=true cannot be combined with "
                                 f"{where}.deepspeed.zero_stage=3: ZeRO-3 partitions parameters and "
                                 f"bitsandbytes 4-bit weights cannot be partitioned; use zero_stage 0, 1 or 2")
        for where, learner in (("sft.learner", self.sft.learner), ("rm.learner", self.rm.learner),
                               ("dpo.learner", self.dpo.learner)):
            if learner.max_tokens_per_micro_batch is not None:
                raise ValueError(f"{where}.max_tokens_per_micro_batch applies to the RL learners (rl.policy, "
                                 f"rl.critic); offline stages batch by {where}.micro_batch_size")
        for where, learner in (("rl.policy", self.rl.policy), ("rl.critic", self.rl.critic)):
            if (learner.max_tokens_per_micro_batch is not None and learner.deepspeed.zero_stage == 3
                    and learner.num_ranks > 1):
                raise ValueError(f"{where}.max_tokens_per_micro_batch with {where}.deepspeed.zero_stage=3 on "
                                 f"{learner.num_ranks} ranks: ZeRO-3 forwards are collectives, and each rank's "
                                 f"scoring shard packs into its own number of micro-batches; use "
                                 f"{where}.micro_batch_size")
        a = self.algorithm
        if get_algorithm(a.name).min_group_size > self.rollout.n_samples_per_prompt:
            raise ValueError(f"algorithm.name={a.name} compares samples within a group and needs "
                             f"rollout.n_samples_per_prompt >= 2, got {self.rollout.n_samples_per_prompt}")
        if a.dual_clip is not None and get_algorithm(a.name).objective != "ppo_clip":
            raise ValueError(f"algorithm.dual_clip applies to PPO's token-level clipped surrogate; algorithm.name="
                             f"{a.name} uses the {get_algorithm(a.name).objective} objective, which has none")
        if IS_CORRECTIONS[a.is_correction] is None:
            for key in ("is_low", "is_high"):
                if getattr(a, key) is not None:
                    raise ValueError(f"algorithm.{key} is the band of is_correction icepop or seq_mask_tis; "
                                     f"algorithm.is_correction={a.is_correction} has none")
        elif not a.is_low < a.is_high:
            raise ValueError(f"algorithm.is_low={a.is_low} must be below algorithm.is_high={a.is_high}")
        if self.rollout.sync.on_logprob_mismatch == "correct" and a.is_correction == "none":
            raise ValueError("rollout.sync.on_logprob_mismatch=correct needs a correction to apply: set "
                             "algorithm.is_correction to tis, mis, icepop or seq_mask_tis (or on_logprob_mismatch=fail)")
        if a.baseline is not None and a.name != "reinforce_pp":
            raise ValueError(f"algorithm.baseline={a.baseline} applies to algorithm.name=reinforce_pp only, "
                             f"got {a.name}")
        if a.baseline == "group_mean" and self.rollout.n_samples_per_prompt < 2:
            raise ValueError("algorithm.baseline=group_mean needs rollout.n_samples_per_prompt >= 2")
        if a.overlong_buffer > self.rollout.max_new_tokens:
            raise ValueError(f"algorithm.overlong_buffer={a.overlong_buffer} exceeds rollout.max_new_tokens="
                             f"{self.rollout.max_new_tokens}")
        if self.rl.critic_init_from is not None and not self.uses_critic:
            raise ValueError(f"rl.critic_init_from is set but algorithm.name={a.name} trains no critic (ppo does)")
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
        if self.rollout.max_turns > 1 and self.env.path is None:
            raise ValueError(f"rollout.max_turns={self.rollout.max_turns} needs env.path: without an environment "
                             f"nothing answers the policy between turns")
        r = self.rollout
        if r.partial and r.mode != "async":
            raise ValueError("rollout.partial=true needs rollout.mode=async (lockstep and lag-1 overlap never have a "
                             "weight push land during a generation)")
        if r.mode == "async" and r.sync.max_off_policy_lag < 1:
            raise ValueError("rollout.mode=async needs rollout.sync.max_off_policy_lag >= 1: the lag bound sizes the "
                             "buffer the generator samples into while the learner trains (0 would be lockstep)")
        if r.mode == "async" and self.algorithm.dynamic_sampling:
            raise ValueError("rollout.mode=async with algorithm.dynamic_sampling=true is not implemented (DAPO's extra "
                             "rounds sample in the step); use rollout.mode=lockstep")
        if r.partial and r.stop:
            raise ValueError("rollout.partial=true with rollout.stop: a stop string split across two chunks would be "
                             "missed; leave rollout.stop empty (EOS still ends a sequence) or set rollout.partial=false")
        if r.partial and r.partial_chunk_tokens >= r.max_new_tokens:
            raise ValueError(f"rollout.partial_chunk_tokens={r.partial_chunk_tokens} must be below rollout."
                             f"max_new_tokens={r.max_new_tokens}, or no generation is ever interrupted")
        if self.env.path is not None and self.rollout.sync.max_off_policy_lag > 0:
            raise ValueError("env.path runs episodes turn by turn from the driver; rollout.sync.max_off_policy_lag "
                             "must be 0 with an environment (overlapped episodes are not implemented)")
        if self.env.path is None and not self.reward.sources:
            raise ValueError("reward.sources is empty and env.path is unset: nothing would score the responses")
        if "rl" in self.run.stages and "rm" not in self.run.stages:
            for src in self.reward.sources:
                if src.kind == "model" and src.path == "stage:rm":
                    raise ValueError("reward.sources uses path 'stage:rm' but run.stages has no 'rm' stage; "
                                     "point the source at a trained reward model folder")
        return self

    @property
    def uses_critic(self) -> bool:
        return get_algorithm(self.algorithm.name).uses_critic

