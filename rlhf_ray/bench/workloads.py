"""The fixed benchmark workloads: model shape, prompts, sampling and the GRPO run configs.

Prompts all have exactly `prompt_len` tokens (sentences of the synthetic language picked by
their token count). Responses run to exactly `response_len` tokens (vLLM's `ignore_eos`, TRL's
`min_new_tokens`); every throughput figure still counts the tokens really generated.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from rlhf_ray.recipes import synthetic
from rlhf_ray.config import (
    AlgorithmConfig,
    CheckpointConfig,
    ClusterConfig,
    DataConfig,
    DatasetConfig,
    KLConfig,
    LearnerConfig,
    ModelConfig,
    RewardConfig,
    RewardFunctionConfig,
    RolloutConfig,
    RunConfig,
    SamplingConfig,
    TrackingConfig,
    TrainConfig,
)
from rlhf_ray.recipes.tiny import make_tiny

REWARD_PATH = "rlhf_ray.bench.reward:letter_fraction"
KL_COEF = 0.04  # TRL's usual GRPO beta; both sides compute reference log-probs with it
LEARNING_RATE = 1e-6
BETAS = (0.9, 0.95)
CLUSTER_CPUS = 8  # logical Ray CPUs: three rollout engines plus the learners fit at once on 2 cores


@dataclass(frozen=True)
class Workload:
    """Sizes of every figure's workload; `FULL` for `make bench`, `QUICK` for the tests."""

    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    prompt_len: int  # tokens per prompt, exactly
    response_len: int  # max_new_tokens
    rollout_prompts: int  # prompts per batch in the rollout figures
    group_size: int  # samples per prompt (n), every figure
    rollout_repeats: int  # measured rounds of the rollout figures, after one warm-up round
    sync_repeats: int  # measured broadcasts, after one warm-up
    sync_sizes: tuple[tuple[int, int], ...]  # (hidden, layers) of more models timed for broadcast seconds vs size
    train_prompts: int  # prompts per GRPO step (end-to-end and overhead)
    train_steps: int  # GRPO steps of each run; the first and the last are not measured
    train_rounds: int  # times the four training runs (e2e, TRL, sync, async) alternate
    async_prompts: int  # prompts per step of the async figure
    async_response_len: int  # long and narrow: generation as slow as the rest of the step
    async_group_size: int  # samples per prompt of the async figure; decoding few sequences is latency-bound

    @property
    def max_model_len(self) -> int:
        return self.prompt_len + max(self.response_len, self.async_response_len) + 8

    def model_dir(self, cache: Path) -> Path:
        return cache / f"qwen2-h{self.hidden_size}-l{self.num_layers}-a{self.num_heads}-kv{self.num_kv_heads}"


# ~31M parameters (hidden 512, 8 layers): big enough that model compute, not Ray calls, sets the pace.
FULL = Workload(
    name="full", hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=2, prompt_len=15, response_len=64,
    rollout_prompts=16, group_size=4, rollout_repeats=3, sync_repeats=4, sync_sizes=((256, 4), (768, 12)),
    train_prompts=4, train_steps=6, train_rounds=2, async_prompts=1, async_response_len=128, async_group_size=2,
)
# make_tiny's default shape (~0.2M parameters): the whole pipeline in a couple of minutes.
QUICK = Workload(
    name="quick", hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, prompt_len=9, response_len=16,
    rollout_prompts=4, group_size=2, rollout_repeats=2, sync_repeats=3, sync_sizes=((128, 2),),
    train_prompts=2, train_steps=4, train_rounds=1, async_prompts=2, async_response_len=16, async_group_size=2,
)


def build_policy(w: Workload, cache: Path) -> Path:
    """The workload's random-init Qwen2 policy folder, built once into `cache`."""
    folder = w.model_dir(cache)
    if not (folder / "policy" / "config.json").is_file():
        make_tiny(
            folder, hidden_size=w.hidden_size, num_layers=w.num_layers, num_heads=w.num_heads,
            num_kv_heads=w.num_kv_heads, max_position=w.max_model_len, reward_model=False,
        )  # fmt: skip
    return folder / "policy"


def prompt_texts(tokenizer, length: int, count: int, seed: int = 0) -> list[str]:
    """`count` distinct sentences of the synthetic language that encode to exactly `length` tokens."""
    found: list[str] = []
    for text in dict.fromkeys(synthetic.pretraining_corpus(20 * count, seed)):
        if len(tokenizer(text)["input_ids"]) == length:
            found.append(text)
            if len(found) == count:
                return found
    raise ValueError(f"only {len(found)} synthetic sentences encode to {length} tokens; pick another prompt_len")


def write_prompts(path: Path, texts: list[str]) -> Path:
    """A JSONL prompt file (`{"prompt": ...}` per line) for the driver."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    return path


def sampling(
    w: Workload, response_len: int | None = None, seed: int | None = None, group_size: int | None = None
) -> SamplingConfig:
    """Temperature-1 sampling of `group_size` (default the workload's) samples per prompt, each exactly the response length."""
    length = response_len or w.response_len
    n = group_size or w.group_size
    return SamplingConfig(n=n, temperature=1.0, max_new_tokens=length, ignore_eos=True, seed=seed)


def grpo_config(
    w: Workload,
    policy_path: Path,
    prompts_file: Path,
    output_dir: Path,
    *,
    prompts_per_step: int,
    response_len: int,
    rollout_actors: int,
    learner_threads: int,
    async_mode: bool,
    old_logprobs: str = "auto",
    group_size: int | None = None,
    dtype: str = "float32",
) -> RunConfig:
    """A GRPO run with the rule reward: one optimizer step per RL step over all of its samples.

    The optimizer settings (lr, betas, clip, KL coefficient and estimator) are the ones the TRL
    baseline gets too (see `trl_baseline.trl_args`).
    """
    group_size = group_size or w.group_size
    samples = prompts_per_step * group_size
    return RunConfig(
        model=ModelConfig(policy_path=str(policy_path), max_model_len=w.max_model_len, dtype=dtype),
        rollout=RolloutConfig(
            num_actors=rollout_actors, kv_cache_space_gib=0.5, sampling=sampling(w, response_len, group_size=group_size)
        ),
        learner=LearnerConfig(
            num_ranks=1, num_cpus_per_rank=learner_threads, lr=LEARNING_RATE, betas=BETAS, grad_clip=1.0,
            micro_batch_size=samples, minibatch_size=samples, ppo_epochs=1,
        ),  # fmt: skip
        algorithm=AlgorithmConfig(
            name="grpo", kl=KLConfig(estimator="k3", placement="loss", coef=KL_COEF), old_logprobs=old_logprobs
        ),
        reward=RewardConfig(use_model=False, functions=[RewardFunctionConfig(path=REWARD_PATH)], num_cpus=0.25),
        data=DataConfig(prompts=DatasetConfig(path=str(prompts_file), template="plain")),
        train=TrainConfig(
            steps=w.train_steps, prompts_per_step=prompts_per_step, async_mode=async_mode, output_dir=str(output_dir)
        ),
        tracking=TrackingConfig(backend="none", log_samples=0),
        checkpoint=CheckpointConfig(keep_last=1),
        cluster=ClusterConfig(num_cpus=CLUSTER_CPUS),
    )


def describe(w: Workload) -> dict:
    """The workload as plain data for results.json."""
    return asdict(w)
