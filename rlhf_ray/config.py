"""The one typed config schema of rlhf_ray.

A run is described by one YAML file validated against `RunConfig`; dotted
`key=value` overrides from the command line are applied before validation.
Every section is a small pydantic model with `extra="forbid"`, so a misspelt
key is an error that names the closest valid key. Each actor and learner
receives only its own section, never the whole config.
"""

from __future__ import annotations

import difflib
import logging
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from rlhf_ray.redaction import REDACTED, environment_secrets, is_secret_name, redact  # noqa: F401 (re-exported)
from rlhf_ray.safe_yaml import YamlError, load_yaml_text, read_yaml_file, shorten

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A config that cannot be used; the message names the field, the value and the fix."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    policy_path: str = Field("", description="Folder of the HF causal LM the policy starts from.")
    reward_path: str = Field("", description="Folder of the HF sequence-classification reward model.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "float32",
        description="Compute dtype of learners, the reference and vLLM engines. auto: bfloat16 where the hardware "
        "multiplies bf16 natively (a bf16 GPU, a CPU with AVX512-BF16/AMX), else float32; resolved when the config "
        "is validated, in the driver, so every actor gets the same concrete dtype.",
    )
    max_model_len: int = Field(512, gt=0, description="Context length (prompt + response) in tokens.")
    trust_remote_code: bool = Field(False, description="Run model code shipped in the model folder.")

    @field_validator("dtype", mode="before")
    @classmethod
    def _resolve_auto(cls, value: Any) -> Any:
        if value != "auto":
            return value
        from rlhf_ray.hardware import resolve_auto_dtype

        return resolve_auto_dtype()


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
    enable_sleep_mode: bool = Field(
        False, description="GPU only: after each generation the vLLM engine sleeps (weights offloaded to CPU, KV cache "
        "freed) so a colocated learner gets the GPU; a weight sync wakes the weights, reloads them, then the KV cache.",
    )
    resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources each actor needs (per tensor-parallel worker), e.g. {rollout: 1}."
    )
    colocate: bool = Field(
        False, description="Hybrid engine: rollout actor i shares learner rank i's GPU (same placement-group bundle, "
        "fractional GPUs that add up to at most 1); weights move by CUDA IPC. Pair it with enable_sleep_mode.",
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
    zero_stage: Literal["auto", 0, 1, 2, 3] = Field(
        "auto", description="DeepSpeed ZeRO stage. auto: 0 on one fp32 rank (nothing to partition; ZeRO-2 there only "
        "adds about 0.4 s of bookkeeping per update on the CPU bench), 2 on several ranks or in bf16.",
    )
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

    def zero_stage_used(self, bf16: bool) -> int:
        """The ZeRO stage the engines run with: `zero_stage`, or for auto 0 on one fp32 rank and 2 otherwise.

        bf16 keeps ZeRO-2 on one rank: stage 0 in bf16 (DeepSpeed's FP16_UnfusedOptimizer, which the learner
        checkpoints handle, learners/checkpoint.py) has not been timed against it yet.
        """
        if self.zero_stage != "auto":
            return int(self.zero_stage)
        return 0 if self.num_ranks == 1 and not bf16 else 2


class ReferenceConfig(Section):
    placement: Literal["actor", "learner"] = Field(
        "actor",
        description="Where the frozen reference policy (the KL anchor) runs. actor: a ReferenceActor of its own, with "
        "its own CPUs/GPU, sent each batch. learner: the policy learner ranks hold it beside the policy and each "
        "computes the reference log-probs of its own rows (no extra process or device; each rank holds the "
        "reference weights too, sharded like the policy under ZeRO-3).",
    )
    colocate: bool = Field(
        False, description="GPU learners only: place the reference in policy learner rank 0's placement-group bundle, "
        "sharing its GPU (num_gpus of it) instead of taking a learner-sized slot of its own.",
    )
    num_gpus: float = Field(
        0.25, gt=0, le=1, description="With colocate: the share of rank 0's GPU the reference asks Ray for; "
        "learner.num_gpus_per_rank plus everything else in that bundle must stay at most 1.",
    )
    num_cpus: float = Field(2.0, gt=0, description="With colocate: CPUs the reference adds to rank 0's bundle.")

    @model_validator(mode="after")
    def _one_placement(self) -> "ReferenceConfig":
        if self.placement == "learner" and self.colocate:
            raise ValueError(
                "reference.placement=learner with reference.colocate=true: a reference the learner ranks hold has "
                "no actor to colocate; fix: set one of them (placement=learner needs no GPU share of its own)"
            )
        return self


class KLConfig(Section):
    estimator: Literal["k1", "k2", "k3"] = "k1"
    placement: Literal["reward", "loss"] = Field(
        "reward", description="Per-token penalty in the reward (PPO) or a loss term (GRPO)."
    )
    coef: float = Field(0.05, ge=0)
    adaptive: bool = False
    target: float = Field(
        6.0, gt=0,
        description="Target KL of the adaptive controller (adaptive only), nats per sequence: the sum over a "
        "response's tokens (the `kl/mean` metric), not the per-token mean (`kl/per_token`).",
    )
    horizon: int = Field(10000, gt=0)
    clamp: float | None = Field(
        10.0, gt=0, description="Bound on |per-token KL estimate| (nats); beyond it the k3 gradient explodes. None: off."
    )


# Settings each algorithm implies unless the config sets them (field -> value; "kl" holds KLConfig fields).
ALGORITHM_PRESETS: dict[str, dict[str, Any]] = {
    "ppo": {"dual_clip": 3.0},
    "grpo": {"kl": {"placement": "loss", "estimator": "k3"}},
    "dr_grpo": {"grpo_normalize_std": False, "loss_agg": "seq_mean_token_sum_norm",
                "kl": {"placement": "loss", "estimator": "k3"}},
    "dapo": {"clip_low": 0.2, "clip_high": 0.28, "loss_agg": "token_mean", "dynamic_sampling": True,
             "kl": {"placement": "loss", "estimator": "k3", "coef": 0.0}},
    "gspo": {"clip_low": 3e-4, "clip_high": 4e-4, "kl": {"placement": "loss", "estimator": "k3"}},
}


class AlgorithmConfig(Section):
    name: Literal["ppo", "grpo", "dr_grpo", "dapo", "gspo", "rloo", "reinforce_pp", "reinforce_pp_baseline"] = Field(
        "ppo",
        description="ppo (GAE + critic), grpo, dr_grpo (no std, constant normaliser), dapo (clip-higher, token "
        "loss, dynamic sampling), gspo (sequence-level ratio), rloo, reinforce_pp, reinforce_pp_baseline (group "
        "baseline); each implies the settings in ALGORITHM_PRESETS unless set (see the README's algorithm table).",
    )
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    clip_low: float = Field(0.2, gt=0, description="eps_low: the ratio is clipped below at 1 - clip_low.")
    clip_high: float = Field(0.2, gt=0, description="eps_high: above at 1 + clip_high (DAPO clip-higher: 0.28).")
    dual_clip: float | None = Field(None, gt=1, description="Cap -dual_clip * A on negative-advantage tokens; ppo: 3.")
    log_ratio_clamp: float | None = Field(
        20.0, gt=0, description="Bound on |log pi/pi_old| and |log pi/pi_ref| before exp(); None: unbounded."
    )
    value_clip: float | None = Field(0.2, gt=0)
    vf_coef: float = Field(0.5, ge=0)
    entropy_coef: float = Field(0.0, ge=0)
    loss_agg: Literal[
        "token_mean", "token_sum", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm"
    ] = Field(
        "token_mean",
        description="token_mean (DAPO token-level), token_sum (the plain sum over the minibatch's response tokens, "
        "no normaliser: the gradient, so the effective lr, grows with the tokens per minibatch; use it to match a "
        "recipe that sums, with lr divided by about the tokens per minibatch), seq_mean_token_mean, "
        "seq_mean_token_sum, seq_mean_token_sum_norm (sum / (B * loss_norm_len), Dr. GRPO). Policy, entropy, KL "
        "and value terms all use it; gspo's loss is a sequence mean and refuses token_sum.",
    )
    loss_norm_len: int | None = Field(
        None, ge=1, description="The constant T of seq_mean_token_sum_norm, tokens; None: the batch's padded width."
    )
    grpo_normalize_std: bool = True
    grpo_std_eps: float = Field(1e-6, gt=0, description="Added to the group std before dividing by it.")
    overlong_buffer: int = Field(
        0, ge=0, description="DAPO soft overlong penalty over the last this many tokens before max_new_tokens; 0: off."
    )
    overlong_penalty: float = Field(1.0, ge=0, description="Reward subtracted at max_new_tokens (linear over the buffer).")
    overlong_filter: bool = Field(False, description="Truncated responses (finish 'length') get no gradient.")
    dynamic_sampling: bool = Field(
        False, description="Drop prompt groups whose rewards are all equal and generate more until the batch is full."
    )
    dynamic_sampling_max_rounds: int = Field(3, ge=0, description="Extra generation rounds per step at most.")
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

    @model_validator(mode="before")
    @classmethod
    def _algorithm_presets(cls, data: Any) -> Any:
        """Fill in the settings `name` implies (ALGORITHM_PRESETS) where the config leaves them unset."""
        if not isinstance(data, dict):
            return data
        preset = ALGORITHM_PRESETS.get(data.get("name", "ppo"), {})
        data = dict(data)
        for key, value in preset.items():
            if key == "kl":
                if isinstance(data.get("kl", {}), dict):
                    data["kl"] = {**value, **data.get("kl", {})}
            else:
                data.setdefault(key, value)
        return data

    @model_validator(mode="after")
    def _gspo_is_a_sequence_mean(self) -> "AlgorithmConfig":
        if self.name == "gspo" and self.loss_agg == "token_sum":
            raise ValueError(
                "algorithm.loss_agg=token_sum with algorithm.name=gspo: GSPO's loss is a mean over sequences of "
                "sequence-level ratios, it has no token sum; fix: leave algorithm.loss_agg unset for gspo"
            )
        return self

    @property
    def uses_critic(self) -> bool:
        return self.name == "ppo"

    @property
    def group_baseline(self) -> bool:
        """Advantages from the group of samples of one prompt (GRPO family, RLOO, REINFORCE++ baseline)."""
        return self.name in ("grpo", "dr_grpo", "dapo", "gspo", "rloo", "reinforce_pp_baseline")


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
    colocate: bool = Field(
        False, description="GPU learners only: place the reward actor in the last policy learner rank's placement-group "
        "bundle, sharing that GPU (num_gpus of it, which must be > 0) instead of a slot of its own.",
    )
    gpu_memory_utilization: float = Field(
        0.3, gt=0, le=1, description="The reward model's vLLM engine on GPU: the fraction of the whole GPU's memory "
        "it takes (weights + KV cache); on a shared GPU, leave the learner rank the rest.",
    )
    kv_cache_space_gib: float = Field(0.5, gt=0, description="KV cache of the reward model's vLLM engine on CPU (GiB).")

    @model_validator(mode="after")
    def _something_scores(self) -> "RewardConfig":
        if not self.use_model and not self.functions:
            raise ValueError("reward.use_model is false and reward.functions is empty: nothing scores")
        return self


class DatasetConfig(Section):
    path: str = Field("", description="A .jsonl or .parquet file, a `datasets` save_to_disk folder, or a hub dataset name.")
    prompt_field: str = "prompt"
    template: Literal["chat", "plain", "zero_shot", "few_shot", "cot"] = "chat"
    few_shot_k: int = Field(3, ge=0)
    few_shot_path: str = Field("", description="Pool of solved examples for few-shot templates.")
    on_error: Literal["error", "skip"] = "error"
    max_skip_fraction: float = Field(0.1, ge=0, le=1)
    split: str = Field("train", description="Split to read from a hub dataset or a `save_to_disk` DatasetDict folder.")
    subset: str = Field("", description="Hub dataset configuration, e.g. 'main' for openai/gsm8k; empty: the default.")
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
    flat_reward_warn_steps: int = Field(
        5, ge=1, description="Warn after this many steps in a row where no prompt's samples got different rewards "
        "(every advantage 0: nothing is learned)."
    )
    flat_reward_stop_steps: int = Field(
        0, ge=0, description="Stop the run (saving a checkpoint) after this many such steps in a row; 0 never stops."
    )
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
    resume: Literal["rewind", "append"] = Field(
        "rewind", description="How `--resume` continues the run's W&B run (the same run id either way). rewind: "
        "back to the checkpoint's step (W&B's `resume_from`), so the steps run again replace the killed run's "
        "and W&B's history equals metrics.jsonl; a server without run rewind refuses it, and the resume then warns "
        "and continues as append. "
        "append: W&B's plain resume, for servers without rewind; W&B ignores steps below the last one it holds, "
        "so it keeps the killed run's values of the steps run again.",
    )


class CheckpointConfig(Section):
    every: int = Field(0, ge=0, description="Save every K steps; 0 saves only at the end.")
    keep_last: int = Field(2, ge=1)


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
    probe_every: int = Field(
        1, ge=0,
        description="Every this many broadcasts, each rollout actor scores a fixed batch of token sequences and its "
        "log-probs must equal the learner's (within probe_tol): proves what vLLM samples from, which checksums of "
        "the tensors sent cannot (e.g. a tied LM head). 0 turns the probe off.",
    )
    probe_tokens: int = Field(32, ge=2, description="Tokens per probe sequence (2 sequences per probe).")
    probe_tol: float | None = Field(
        None, gt=0,
        description="Largest mean |vLLM - learner| probe log-prob, nats/token; None: 1e-3 for float32 weights, "
        "5e-2 for bf16/fp16.",
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
    reference: ReferenceConfig = Field(default_factory=ReferenceConfig)
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
    def logprob_temperature(self) -> float:
        """The temperature of every learner and reference log-prob: log_softmax(logits / T) at the sampled tokens.

        vLLM reports log-probs of the distribution it sampled from (`processed_logprobs`), so the
        learner's old log-probs, the update's, the reference's and the mismatch metric must use the
        same T, or the importance ratio, TIS weight and KL are skewed. Greedy (T = 0) reports T = 1.
        """
        temperature = self.rollout.sampling.temperature
        return temperature if temperature > 0 else 1.0

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
        if self.algorithm.group_baseline and self.rollout.sampling.n < 2:
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
        if self.train.async_mode and self.algorithm.dynamic_sampling:
            raise ValueError(
                f"algorithm.dynamic_sampling=true (algorithm.name={self.algorithm.name}) generates extra rounds within "
                "a step, which async mode's one-step-ahead batch does not allow; set train.async_mode=false or "
                "algorithm.dynamic_sampling=false"
            )
        if self.train.async_mode and self.train.max_staleness != 1:
            raise ValueError(
                f"train.async_mode=true generates exactly one step ahead (staleness 1), but "
                f"train.max_staleness={self.train.max_staleness}: set train.max_staleness=1"
            )
        ro, le = self.rollout, self.learner
        if ro.colocate and not (0 < ro.num_gpus_per_actor and 0 < le.num_gpus_per_rank
                                and ro.num_gpus_per_actor + le.num_gpus_per_rank <= 1.0):
            raise ValueError(
                f"rollout.colocate=true puts a rollout actor and a learner rank on one GPU, so their shares must add up "
                f"to at most 1, got rollout.num_gpus_per_actor={ro.num_gpus_per_actor} + learner.num_gpus_per_rank="
                f"{le.num_gpus_per_rank}; fix: e.g. 0.4 and 0.6"
            )
        if ro.colocate and (ro.num_actors != le.num_ranks or ro.tensor_parallel_size != 1):
            raise ValueError(
                f"rollout.colocate=true pairs each rollout actor with one learner rank on its GPU, so rollout.num_actors "
                f"(got {ro.num_actors}) must equal learner.num_ranks (got {le.num_ranks}) and "
                f"rollout.tensor_parallel_size must be 1 (got {ro.tensor_parallel_size})"
            )
        if ro.colocate and self.weight_sync.backend in ("nccl", "gloo"):
            raise ValueError(
                f"rollout.colocate=true shares GPUs, but weight_sync.backend={self.weight_sync.backend}: NCCL refuses two "
                "ranks on one GPU and gloo would copy through the host; set weight_sync.backend=auto (CUDA IPC)"
            )
        self._check_shared_gpus()
        if self.rollout.enable_sleep_mode and self.rollout.num_gpus_per_actor == 0:
            raise ValueError(
                "rollout.enable_sleep_mode=true needs GPU rollout actors, but rollout.num_gpus_per_actor=0: vLLM's CPU "
                "build has no sleep mode (its engine refuses the option); set rollout.enable_sleep_mode=false"
            )
        if self.rollout.enable_sleep_mode and self.train.async_mode:
            raise ValueError(
                "rollout.enable_sleep_mode=true frees the GPU while the learner trains, but train.async_mode=true "
                "generates during training; set one of them to false"
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

    def _check_shared_gpus(self) -> None:
        """reference.colocate / reward.colocate: GPU learners, a GPU share for the reward, and every policy learner
        bundle (a rank plus what shares its GPU) at most one GPU."""
        le, rw = self.learner, self.reward
        for field, on in (("reference.colocate", self.reference.colocate), ("reward.colocate", rw.colocate)):
            if on and le.num_gpus_per_rank == 0:
                raise ValueError(
                    f"{field}=true shares a policy learner rank's GPU, but learner.num_gpus_per_rank=0 (CPU learners); "
                    f"fix: set {field}=false, or give the learners GPUs"
                )
        if rw.colocate and rw.num_gpus == 0:
            raise ValueError(
                "reward.colocate=true shares a learner GPU, but reward.num_gpus=0; fix: give the reward its share of "
                "the GPU (e.g. reward.num_gpus=0.2) or set reward.colocate=false"
            )
        from rlhf_ray.sizing import bundle_members, policy_bundles  # sizing imports this module

        for i, bundle in enumerate(policy_bundles(self)):
            if bundle.get("GPU", 0.0) > 1.0 + 1e-9:
                members = bundle_members(self)[i]
                shares = " + ".join(f"{name} {share:g}" for name, share in members)
                raise ValueError(
                    f"policy learner rank {i}'s GPU would hold {shares} = {bundle['GPU']:g} GPUs, more than one GPU; "
                    "fix: lower learner.num_gpus_per_rank or the shares of what is colocated with it "
                    "(rollout.num_gpus_per_actor, reference.num_gpus, reward.num_gpus)"
                )


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
    data = apply_overrides(data, list(overrides or []))
    cfg = validate_config(data, source)
    for note in preset_conflicts(data.get("algorithm")):
        log.warning("%s (%s)", note, source)
    return cfg


def preset_conflicts(algorithm: Any) -> list[str]:
    """The settings of the chosen algorithm's preset (ALGORITHM_PRESETS) that the config sets otherwise.

    The config's own value wins, as documented; this names each such case, because switching
    `algorithm.name` on a config written for another algorithm silently keeps that algorithm's loss.
    """
    if not isinstance(algorithm, dict):
        return []
    name = algorithm.get("name", "ppo")
    notes = []
    for key, implied in ALGORITHM_PRESETS.get(name, {}).items():
        given = algorithm.get(key)
        pairs = (
            [(f"kl.{k}", v, given.get(k)) for k, v in implied.items()] if key == "kl" and isinstance(given, dict)
            else [(key, implied, given)] if key != "kl" else []
        )
        for field, value, set_to in pairs:
            if set_to is not None and set_to != value:
                notes.append(
                    f"algorithm.name={name} implies algorithm.{field}={value}, but the config sets {str(set_to)[:80]}, "
                    f"which is used; fix: drop algorithm.{field} from the config to get {name}'s setting"
                )
    return notes


def save_resolved(cfg: RunConfig, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML with secrets redacted."""
    Path(path).write_text(yaml.safe_dump(redact(cfg.model_dump(mode="json")), sort_keys=False))
