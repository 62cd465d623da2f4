"""The one typed config schema of rlhf_ray.

A run is described by one YAML file validated against `RunConfig`; dotted
`key=value` overrides from the command line are applied before validation.
Every section is a small pydantic model with `extra="forbid"`, so a misspelt
key is an error that names the closest valid key. Each actor and learner
receives only its own section, never the whole config.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from rlhf_ray.redaction import REDACTED, environment_secrets, is_secret_name, redact  # noqa: F401 (re-exported)
from rlhf_ray.safe_yaml import YamlError, load_yaml_text, read_yaml_file, shorten


class ConfigError(ValueError):
    """A config that cannot be used; the message names the field, the value and the fix."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    policy_path: str = Field("", description="Folder of the HF causal LM the policy starts from.")
    reward_path: str = Field("", description="Folder of the HF sequence-classification reward model.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Compute dtype of learners and vLLM engines (fp32 on CPU)."
    )
    max_model_len: int = Field(512, gt=0, description="Context length (prompt + response) in tokens.")
    trust_remote_code: bool = Field(False, description="Run model code shipped in the model folder.")


class SamplingConfig(Section):
    n: int = Field(1, ge=1, description="Samples per prompt (the group size for GRPO/RLOO).")
    temperature: float = Field(1.0, ge=0.0, description="Softmax temperature; 0 is greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(-1, ge=-1, description="-1 disables top-k.")
    max_new_tokens: int = Field(64, gt=0)
    stop: list[str] = Field(default_factory=list, description="Stop strings.")
    ignore_eos: bool = Field(False, description="Keep generating past EOS to max_new_tokens (fixed-length benchmarks).")
    seed: int | None = Field(None, description="Sampling seed; None derives one per request.")


class RolloutConfig(Section):
    num_actors: int = Field(1, ge=1, description="vLLM rollout actors in the pool.")
    num_cpus_per_actor: float = Field(1.0, gt=0)
    num_gpus_per_actor: float = Field(0.0, ge=0, description="GPUs per tensor-parallel worker.")
    tensor_parallel_size: int = Field(1, ge=1)
    gpu_memory_utilization: float = Field(0.3, gt=0.0, le=1.0)
    kv_cache_space_gib: float = Field(1.0, gt=0, description="VLLM_CPU_KVCACHE_SPACE on CPU.")
    pin_cpu_cores: bool = Field(True, description="Pin actor i to core i mod nproc on CPU.")
    enable_sleep_mode: bool = Field(False, description="vLLM sleep/wake between rollouts (GPU).")
    resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources each actor needs, e.g. {rollout: 1}."
    )
    call_timeout_s: float = Field(600.0, gt=0, description="Per-call timeout before an actor is declared hung.")
    max_replacements: int = Field(
        2, ge=0, description="Dead rollout actors the pool replaces during a run; one more death fails the run."
    )
    truncate_prompts: bool = Field(False, description="Left-truncate prompts over the context instead of failing.")
    seed: int = 0
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)


class LearnerConfig(Section):
    num_ranks: int = Field(1, ge=1, description="DeepSpeed ranks (Ray actors) in the learner group.")
    num_cpus_per_rank: float = Field(1.0, gt=0)
    num_gpus_per_rank: float = Field(0.0, ge=0)
    resources: dict[str, float] = Field(default_factory=dict)
    zero_stage: Literal[0, 1, 2, 3] = 2
    gradient_checkpointing: bool = False
    grad_clip: float = Field(1.0, gt=0)
    lr: float = Field(1e-5, gt=0)
    critic_lr: float = Field(1e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = Field(0, ge=0, description="Optimizer steps of linear warm-up.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Cosine decay floor as a fraction of lr.")
    micro_batch_size: int = Field(4, ge=1, description="Sequences per rank per forward/backward.")
    minibatch_size: int = Field(8, ge=1, description="Sequences per optimizer step, all ranks together.")
    ppo_epochs: int = Field(1, ge=1)
    max_consecutive_skips: int = Field(
        3, ge=1, description="RL steps in a row whose update is skipped (non-finite) that stop the run."
    )
    call_timeout_s: float = Field(1800.0, gt=0)
    master_port: int = Field(
        0, ge=0, le=65535, description="Port learner rank 0 listens on for the group's torch.distributed store; "
        "0: one its node picks when it binds.",
    )
    seed: int = 0


class KLConfig(Section):
    estimator: Literal["k1", "k2", "k3"] = "k1"
    placement: Literal["reward", "loss"] = Field(
        "reward", description="Per-token penalty in the reward (PPO) or a loss term (GRPO)."
    )
    coef: float = Field(0.05, ge=0)
    adaptive: bool = False
    target: float = Field(6.0, gt=0, description="Target KL in nats per sequence (adaptive only).")
    horizon: int = Field(10000, gt=0)


class AlgorithmConfig(Section):
    name: Literal["ppo", "grpo", "rloo", "reinforce_pp"] = "ppo"
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    clip_low: float = Field(0.2, gt=0)
    clip_high: float = Field(0.2, gt=0)
    dual_clip: float | None = Field(None, gt=1)
    value_clip: float | None = Field(0.2, gt=0)
    vf_coef: float = Field(0.5, ge=0)
    entropy_coef: float = Field(0.0, ge=0)
    loss_agg: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"] = "token_mean"
    grpo_normalize_std: bool = True
    whiten_advantages: bool = True
    tis_cap: float | None = Field(2.0, gt=0, description="Truncated importance weight cap; None disables.")
    logprob_mismatch_warn: float = Field(
        0.05, gt=0, description="Warn when |vLLM - learner| log-prob mean exceeds this (nats/token)."
    )
    old_logprobs: Literal["auto", "recompute"] = Field(
        "auto",
        description="auto: when a step's update is one optimizer step over a synchronous batch with the KL in the "
        "loss and untruncated sampling (top_p 1, no top_k), the update's own log-probs (detached) are the old ones "
        "and the separate learner forward is skipped; "
        "recompute: always run that forward.",
    )
    kl: KLConfig = Field(default_factory=KLConfig)

    @property
    def uses_critic(self) -> bool:
        return self.name == "ppo"


class RewardFunctionConfig(Section):
    path: str = Field(..., description="Dotted path `package.module:function`.")
    weight: float = 1.0


class RewardConfig(Section):
    use_model: bool = Field(True, description="Score with the reward model at model.reward_path.")
    model_weight: float = 1.0
    functions: list[RewardFunctionConfig] = Field(default_factory=list)
    clip: float | None = Field(None, gt=0, description="Clip the combined reward to [-clip, clip].")
    normalize: bool = Field(False, description="Running mean/std normalisation of the reward.")
    retries: int = Field(1, ge=0, description="Retries of a rule function that raised or returned a bad value.")
    timeout_s: float = Field(60.0, gt=0, description="Per call of the reward actor, and per import of a rule "
                             "function in its process (s).")
    row_timeout_s: float = Field(10.0, gt=0, description="Per row of a rule function; a slower row is masked "
                                 "and counted in reward/masked_rows (s).")
    memory_mb: int = Field(4096, ge=0, description="Address-space cap of each rule function's process (MiB); "
                           "0: none.")
    env_passthrough: list[str] = Field(default_factory=list, description="Environment variables a rule function's "
                                       "process receives besides PATH, locale and PYTHONPATH (none by default).")
    num_cpus: float = Field(1.0, gt=0)
    num_gpus: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _something_scores(self) -> "RewardConfig":
        if not self.use_model and not self.functions:
            raise ValueError("reward.use_model is false and reward.functions is empty: nothing scores")
        return self


class DatasetConfig(Section):
    path: str = Field("", description="JSONL or Parquet file.")
    prompt_field: str = "prompt"
    template: Literal["chat", "plain", "zero_shot", "few_shot", "cot"] = "chat"
    few_shot_k: int = Field(3, ge=0)
    few_shot_path: str = Field("", description="Pool of solved examples for few-shot templates.")
    on_error: Literal["error", "skip"] = "error"
    max_skip_fraction: float = Field(0.1, ge=0, le=1)
    split: str = Field("train", description="Split to read when `path` names a `datasets` hub dataset.")
    messages_field: str = Field("messages", description="Chat turns [{role, content}]; used instead of prompt_field.")
    response_field: str = Field("response", description="SFT target text.")
    chosen_field: str = "chosen"
    rejected_field: str = "rejected"
    answer_field: str = Field("answer", description="Ground truth for rule rewards and few-shot examples.")
    require_answer: bool = Field(False, description="Every prompt row must carry answer_field (rule rewards).")
    system_prompt: str = Field("", description="System message for the chat template; empty adds none.")
    special_tokens: Literal["refuse", "escape"] = Field(
        "refuse", description="Row text holding a special token's text (e.g. <|im_end|>): refuse: a bad row; escape: "
        "tokenised as plain text (a zero-width space after its first character).",
    )
    max_chars: int = Field(1_000_000, ge=1, description="Characters per text field, checked before tokenising.")


class DataConfig(Section):
    prompts: DatasetConfig = Field(default_factory=DatasetConfig)
    sft: DatasetConfig = Field(default_factory=DatasetConfig)
    preferences: DatasetConfig = Field(default_factory=DatasetConfig)
    eval: DatasetConfig = Field(default_factory=DatasetConfig)
    shuffle: bool = True
    seed: int = 0


class TrainConfig(Section):
    steps: int = Field(10, ge=1, description="RL steps (rollout + update + broadcast).")
    prompts_per_step: int = Field(8, ge=1, description="Prompts per rollout batch (B).")
    async_mode: bool = False
    max_staleness: int = Field(
        1, ge=0, description="Policy versions a sample may lag in async mode; the driver generates exactly one step "
        "ahead, so async mode needs 1."
    )
    eval_every: int = Field(0, ge=0)
    max_learner_restarts: int = Field(
        2, ge=0, description="Times `rlhf-ray train` resumes from the last complete checkpoint after a learner rank dies."
    )
    output_dir: str = "runs"
    run_name: str = Field("", description="Folder name of the run inside output_dir (one path component); "
                          "empty: a time stamp.")
    seed: int = 0

    @field_validator("run_name")
    @classmethod
    def _inside_output_dir(cls, name: str) -> str:
        if name and (name in (".", "..") or "/" in name or "\\" in name or "\0" in name):
            raise ValueError("must be one folder name inside train.output_dir (no '/', '..' or absolute path); "
                             "fix: set train.output_dir to the parent folder and train.run_name to the last part")
        return name


class SupervisedConfig(Section):
    """A supervised stage (pretraining, SFT or reward-model training) on the learner group."""

    epochs: int = Field(1, ge=1)
    lr: float = Field(1e-4, gt=0)
    batch_size: int = Field(32, ge=1, description="Sequences (or pairs) per optimizer step, all ranks together.")
    max_len: int = Field(256, gt=0, description="Tokens per training sequence; longer rows are an error.")
    eval_fraction: float = Field(0.1, ge=0, lt=1, description="Rows held out for evaluation by `rlhf-ray sft` (eval/sft_loss) and `rlhf-ray rm` (eval/rm_accuracy); the demo holds out its own.")


class TrackingConfig(Section):
    backend: Literal["wandb", "none"] = "wandb"
    project: str = "rlhf_ray"
    entity: str = ""
    mode: Literal["offline", "online", "disabled"] = "offline"
    log_samples: int = Field(8, ge=0, description="Generations per step in the W&B table.")


class CheckpointConfig(Section):
    every: int = Field(0, ge=0, description="Save every K steps; 0 saves only at the end.")
    keep_last: int = Field(2, ge=1)
    resume: bool = False


class WeightSyncConfig(Section):
    backend: Literal["auto", "gloo", "nccl", "cuda_ipc"] = "auto"
    bucket_mb: float = Field(64.0, gt=0)
    master_addr: str = Field(
        "", description="Address learner rank 0 listens on for the weight-sync group; empty: its node's address "
        "as Ray knows it (127.0.0.1 for a local head). Set it, or `interface`, on hosts with several networks.",
    )
    interface: str = Field(
        "", description="Network interface (e.g. eth1) whose IPv4 address learner rank 0 listens on, like "
        "NCCL_SOCKET_IFNAME; used when master_addr is empty.",
    )
    timeout_s: float = Field(120.0, gt=0)
    verify: bool = Field(True, description="Compare per-layer checksums after every broadcast.")
    verify_columns: int = Field(
        32, ge=0,
        description="Input columns per linear weight that CPU vLLM has repacked for its kernel and so reads back "
        "through it (identity rows), drawn afresh from each policy version; 0 reads every column (exact but slow: "
        "the read costs in_features times one token's FLOPs). Other tensors are always summed whole.",
    )


class ClusterConfig(Section):
    address: str = Field("", description="Ray address; empty starts a local head on 127.0.0.1.")
    host: str = Field("127.0.0.1", description="Address a local head and its servers bind to.")
    dashboard: bool = False
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a local head; None uses all.")
    env_passthrough: list[str] = Field(
        default_factory=lambda: ["WANDB_API_KEY", "HF_TOKEN"],
        description="Environment variables forwarded to workers by name, never logged.",
    )


class RunConfig(Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    pretrain: SupervisedConfig = Field(default_factory=SupervisedConfig)
    sft: SupervisedConfig = Field(default_factory=SupervisedConfig)
    rm: SupervisedConfig = Field(default_factory=SupervisedConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    weight_sync: WeightSyncConfig = Field(default_factory=WeightSyncConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)

    @property
    def skips_old_logprobs(self) -> bool:
        """Whether the driver skips the learner's old-log-prob forward (see `algorithm.old_logprobs`).

        Exact when the policy takes one optimizer step on the batch: before that step the policy is
        the one the update starts from, so the update's own log-probs, detached, are the old ones.
        The KL metrics then use vLLM's log-probs of the same policy, which the learner matches (the
        per-step rollout/logprob_diff_* metrics, measured inside the update, show by how much) as
        long as sampling does not truncate the vocabulary (top_p 1, no top_k).
        """
        sampling = self.rollout.sampling
        samples = self.train.prompts_per_step * sampling.n
        return (
            self.algorithm.old_logprobs == "auto"
            and sampling.top_p == 1.0
            and sampling.top_k in (-1, 0)
            and self.learner.ppo_epochs == 1
            and self.learner.minibatch_size == samples
            and self.algorithm.kl.placement == "loss"
            and not self.train.async_mode
        )

    @model_validator(mode="after")
    def _cross_field(self) -> "RunConfig":
        samples = self.train.prompts_per_step * self.rollout.sampling.n
        mb, ranks = self.learner.minibatch_size, self.learner.num_ranks
        if mb % (ranks * self.learner.micro_batch_size):
            raise ValueError(
                f"learner.minibatch_size={mb} must be divisible by learner.num_ranks × "
                f"learner.micro_batch_size = {ranks}×{self.learner.micro_batch_size}; "
                f"e.g. set learner.minibatch_size={ranks * self.learner.micro_batch_size}"
            )
        if samples % mb:
            raise ValueError(
                f"samples per step = train.prompts_per_step × rollout.sampling.n = {samples} must be "
                f"divisible by learner.minibatch_size={mb}"
            )
        if self.algorithm.name in ("grpo", "rloo") and self.rollout.sampling.n < 2:
            raise ValueError(
                f"algorithm.name={self.algorithm.name} needs rollout.sampling.n >= 2 (a group per prompt), "
                f"got {self.rollout.sampling.n}"
            )
        if self.algorithm.name in ("grpo", "rloo") and self.rollout.sampling.temperature == 0:
            raise ValueError(
                f"algorithm.name={self.algorithm.name} with rollout.sampling.temperature=0 draws "
                f"{self.rollout.sampling.n} identical greedy samples per prompt: every advantage is 0 and "
                "nothing is learnt; fix: set rollout.sampling.temperature > 0 (e.g. 1.0)"
            )
        if self.rollout.sampling.max_new_tokens >= self.model.max_model_len:
            raise ValueError(
                f"rollout.sampling.max_new_tokens={self.rollout.sampling.max_new_tokens} leaves no room "
                f"for a prompt in model.max_model_len={self.model.max_model_len}; fix: lower "
                "rollout.sampling.max_new_tokens or raise model.max_model_len"
            )
        if self.train.async_mode and self.train.max_staleness != 1:
            raise ValueError(
                f"train.async_mode=true generates exactly one step ahead (staleness 1), but "
                f"train.max_staleness={self.train.max_staleness}: set train.max_staleness=1"
            )
        if self.weight_sync.backend == "cuda_ipc" and self.rollout.tensor_parallel_size != 1:
            raise ValueError(
                f"weight_sync.backend=cuda_ipc shares the learner's GPU memory with one colocated vLLM worker, but "
                f"rollout.tensor_parallel_size={self.rollout.tensor_parallel_size}; use weight_sync.backend=nccl"
            )
        if self.weight_sync.backend in ("nccl", "cuda_ipc") and self.learner.num_gpus_per_rank == 0:
            raise ValueError(
                f"weight_sync.backend={self.weight_sync.backend} needs GPUs; "
                "set learner.num_gpus_per_rank > 0 or weight_sync.backend=gloo"
            )
        return self


# ---------------------------------------------------------------- loading


def _all_keys(model: type[BaseModel]) -> list[str]:
    return list(model.model_fields)


def _section_at(loc: tuple[Any, ...]) -> type[BaseModel]:
    model: type[BaseModel] = RunConfig
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None:
            break
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
        else:
            break
    return model


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        loc = tuple(e["loc"])
        dotted = ".".join(str(p)[:100] for p in loc) or "<root>"  # a key can be as long as the file
        if e["type"] == "extra_forbidden":
            parent = _section_at(loc[:-1])
            close = difflib.get_close_matches(str(loc[-1]), _all_keys(parent), n=1, cutoff=0.5)
            hint = f"did you mean '{'.'.join([*map(str, loc[:-1]), close[0]])}'?" if close else (
                f"valid keys here: {', '.join(_all_keys(parent))}"
            )
            lines.append(f"  {dotted}: unknown key; {hint}")
        else:
            value = e.get("input")
            shown = "" if isinstance(value, dict) else f" (got {shorten(value)})"
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"  {dotted}: {msg}{shown}")
    return "\n".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split `a.b.c=value` into a key path and a YAML-parsed value."""
    if "=" not in text:
        raise ConfigError(f"override {shorten(text)} is not of the form key.path=value")
    key, raw = text.split("=", 1)
    if not key:
        raise ConfigError(f"override {shorten(text)} has an empty key")
    try:
        return key.split("."), load_yaml_text(raw, f"override {key}") if raw else ""
    except YamlError as err:
        raise ConfigError(f"{err}; the value is read as YAML: quote it, e.g. {key}='\"...\"'") from None


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {shorten(text)}: '{part}' is a value, not a section")
            node = child
        node[path[-1]] = value
    return data


def validate_config(data: dict[str, Any], source: str = "<dict>") -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML config (or the defaults when path is None), apply overrides, validate."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {shorten(str(p))} does not exist; fix: check the path")
        try:
            data = read_yaml_file(p) or {}
        except YamlError as err:
            raise ConfigError(f"config file {err}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping at the top level")
        source = str(p)
    return validate_config(apply_overrides(data, list(overrides or [])), source)


def save_resolved(cfg: RunConfig, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML with secrets redacted."""
    Path(path).write_text(yaml.safe_dump(redact(cfg.model_dump(mode="json")), sort_keys=False))
