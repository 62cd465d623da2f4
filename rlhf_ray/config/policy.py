"""Config sections of the models and the processes that run them: model, rollout (vLLM), learner, reference."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from rlhf_ray.config.base import Section


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
        checkpoints handle, learners/checkpoint.py) timed the same on the bench model (update 1.32 s against 1.35 s).
        """
        if self.zero_stage != "auto":
            return int(self.zero_stage)
        return 0 if self.num_ranks == 1 and not bf16 else 2


class ReferenceConfig(Section):
    placement: Literal["actor", "learner"] = Field(
        "learner",
        description="Where the frozen reference policy (the KL anchor) runs. learner (default): the policy learner "
        "ranks hold it beside the policy and each computes the reference log-probs of its own rows, on all of the "
        "learners' devices at once (no extra process or device; each rank holds the reference weights too, sharded "
        "like the policy under ZeRO-3). actor: a ReferenceActor of its own, with its own CPUs/GPU, sent each batch; "
        "needed for reference.colocate.",
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
                "reference.placement=learner (the default) with reference.colocate=true: a reference the learner "
                "ranks hold has no actor to colocate; fix: set reference.placement=actor to colocate a reference "
                "actor, or drop reference.colocate (placement=learner needs no GPU share of its own)"
            )
        return self
