"""The config tree: `load_config(path, overrides)` returns a validated, frozen `Config`."""
from rlhf_ray.config.load import ConfigError, dump_config, load_config, save_config, validate
from rlhf_ray.config.schema import (
    AlgorithmConfig, ClusterConfig, Config, DataConfig, DeepSpeedConfig, LearnerConfig, LoggingConfig,
    EnvConfig, LoraConfig, ModelConfig, OptimConfig, QuantizationConfig, ReferenceConfig, RewardConfig, RewardSource,
    RLConfig, RolloutConfig, RunConfig, ServeConfig, StageConfig, SyncConfig,
)

__all__ = [
    "ConfigError", "dump_config", "load_config", "save_config", "validate", "AlgorithmConfig", "ClusterConfig",
    "Config", "DataConfig", "DeepSpeedConfig", "LearnerConfig", "LoggingConfig", "LoraConfig", "ModelConfig",
    "EnvConfig", "OptimConfig", "QuantizationConfig", "ReferenceConfig", "RewardConfig", "RewardSource", "RLConfig",
    "RolloutConfig", "RunConfig", "ServeConfig", "StageConfig", "SyncConfig",
]
