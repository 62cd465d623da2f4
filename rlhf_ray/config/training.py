"""Config sections of the stages' loops: train, the supervised stages, tracking, checkpoints."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from rlhf_ray.config.base import Section


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
