"""`RunConfig`: every section of a run, and the checks that span sections."""

from __future__ import annotations

from pydantic import Field, model_validator

from rlhf_ray.config.algorithm import AlgorithmConfig
from rlhf_ray.config.base import Section
from rlhf_ray.config.cluster import WeightSyncConfig, ClusterConfig
from rlhf_ray.config.data import RewardConfig, DataConfig
from rlhf_ray.config.policy import ModelConfig, RolloutConfig, LearnerConfig, ReferenceConfig
from rlhf_ray.config.training import TrainConfig, SupervisedConfig, TrackingConfig, CheckpointConfig


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
