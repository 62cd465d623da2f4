"""Config sections of what is scored and read: reward model and functions, datasets."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from rlhf_ray.config.base import Section


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
