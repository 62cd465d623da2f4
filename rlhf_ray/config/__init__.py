"""The one typed config schema of rlhf_ray.

A run is described by one YAML file validated against `RunConfig`; dotted
`key=value` overrides from the command line are applied before validation.
Every section is a small pydantic model with `extra="forbid"`, so a misspelt
key is an error that names the closest valid key. Each actor and learner
receives only its own section, never the whole config.

The sections live in modules by topic (`base`, `policy`, `algorithm`, `data`, `training`, `cluster`, `schema`, `loading`);
import every name from `rlhf_ray.config`."""

from __future__ import annotations

from rlhf_ray.config.base import ConfigError, Section
from rlhf_ray.config.policy import ModelConfig, SamplingConfig, RolloutConfig, LearnerConfig, ReferenceConfig
from rlhf_ray.config.algorithm import KLConfig, ALGORITHM_PRESETS, AlgorithmConfig
from rlhf_ray.config.data import RewardFunctionConfig, RewardConfig, DatasetConfig, DataConfig
from rlhf_ray.config.training import TrainConfig, SupervisedConfig, TrackingConfig, CheckpointConfig
from rlhf_ray.config.cluster import WeightSyncConfig, ClusterConfig
from rlhf_ray.config.schema import RunConfig
from rlhf_ray.config.loading import parse_override, apply_overrides, validate_config, load_config, preset_conflicts, save_resolved
from rlhf_ray.redaction import REDACTED, environment_secrets, is_secret_name, redact

__all__ = [
    "REDACTED", "environment_secrets", "is_secret_name", "redact", "ConfigError", "Section", "ModelConfig",
    "SamplingConfig", "RolloutConfig", "LearnerConfig", "ReferenceConfig", "KLConfig", "ALGORITHM_PRESETS",
    "AlgorithmConfig", "RewardFunctionConfig", "RewardConfig", "DatasetConfig", "DataConfig", "TrainConfig",
    "SupervisedConfig", "TrackingConfig", "CheckpointConfig", "WeightSyncConfig", "ClusterConfig",
    "RunConfig", "parse_override", "apply_overrides", "validate_config", "load_config", "preset_conflicts",
    "save_resolved",
]
