"""Numerical guards of the RL driver: bad rewards are masked, a non-finite update is skipped, and too
many skipped updates in a row stop the run while the last complete checkpoint stays in place.

Three layers keep NaN/inf away from the weights:
- `guard_rewards`: a reward batch of the wrong shape is an error; non-finite or absurd scores
  (|r| > 1e6, the bound rule functions are held to) are masked like a failed rule function.
- `StepGuard.update`: experience (advantages, returns, log-probs, values) holding NaN/inf skips the
  whole update on the driver, before any learner sees it, and the KL controller is not updated.
- the learner's own guard (`learners.training`): a non-finite loss or gradient on any rank vetoes
  that optimizer step on all ranks. An update whose every optimizer step was vetoed counts as skipped.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from rlhf_ray.algorithms import first_nonfinite
from rlhf_ray.checkpoint import latest_complete
from rlhf_ray.config import RunConfig

log = logging.getLogger(__name__)

MAX_ABS_REWARD = 1e6
EXPERIENCE_FIELDS = ("advantages", "returns", "old_values", "old_logprobs", "ref_logprobs", "rollout_logprobs")


class RewardShapeError(ValueError):
    """The reward batch does not hold one score per sample."""


class TooManySkippedSteps(RuntimeError):
    """`learner.max_consecutive_skips` RL steps in a row skipped their update."""


def guard_rewards(rewards: dict[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
    """Check `rewards["scores"]` and `rewards["valid"]` are [n]; mask scores that are NaN, ±inf or > 1e6 in size.

    Returns a copy with those rows' scores set to 0 and `valid` False (the driver zeroes their advantages
    and counts them in `reward/masked_rows`).
    """
    for key in ("scores", "valid"):
        shape = list(rewards[key].shape)
        if shape != [n]:
            raise RewardShapeError(
                f"reward {key} has shape {shape}, expected [{n}] (one per sample = train.prompts_per_step × "
                "rollout.sampling.n); fix: the reward actor and each reward function must return one float per sample"
            )
    scores = rewards["scores"]
    bad = ~torch.isfinite(scores) | (scores.abs() > MAX_ABS_REWARD)
    if bad.any():
        rows = bad.nonzero().flatten().tolist()
        log.warning("masked %d reward(s) that were NaN, inf or over %g in size (rows %s)", len(rows), MAX_ABS_REWARD, rows[:10])
    return dict(rewards, scores=scores.masked_fill(bad, 0.0), valid=rewards["valid"] & ~bad)


class StepGuard:
    """Skips updates on non-finite experience, counts skipped updates, stops after too many in a row."""

    def __init__(self, max_consecutive_skips: int, updates_per_step: int, checkpoint_root: Path | None = None):
        self.max_consecutive_skips = max_consecutive_skips
        self.updates_per_step = updates_per_step  # optimizer steps of one full policy update
        self.checkpoint_root = checkpoint_root
        self.consecutive = 0
        self.applied = True  # whether the last update changed the policy

    @classmethod
    def for_run(cls, cfg: RunConfig, checkpoint_root: Path | None) -> "StepGuard":
        samples = cfg.train.prompts_per_step * cfg.rollout.sampling.n
        updates = cfg.learner.ppo_epochs * (samples // cfg.learner.minibatch_size)
        return cls(cfg.learner.max_consecutive_skips, updates, checkpoint_root)

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs: the consecutive-skip count (and whether the last update applied)."""
        return {"consecutive": self.consecutive, "applied": self.applied}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.consecutive, self.applied = int(state["consecutive"]), bool(state["applied"])

    @staticmethod
    def check_experience(exp: dict[str, Any]) -> str | None:
        """Describe the first experience field holding NaN/inf, or None when all are finite."""
        return first_nonfinite({k: exp[k] for k in EXPERIENCE_FIELDS if torch.is_tensor(exp.get(k))})

    def update(
        self, step: int, exp: dict[str, Any], policy: Any, critic: Any | None, temperature: float = 1.0
    ) -> dict[str, float]:
        """Run the policy (and critic) update on `exp` unless it holds NaN/inf; returns the train/ metrics.

        temperature: the policy's log-probs are log_softmax(logits / temperature) (`RunConfig.logprob_temperature`).
        """
        reason = self.check_experience(exp)
        if reason is not None:
            metrics = {"train/skipped_steps": float(self.updates_per_step)}
        else:
            metrics = policy.ppo_update(exp, temperature)
            if critic is not None:
                metrics |= {k if "value" in k else k.replace("train/", "train/critic_"): v
                            for k, v in critic.value_update(exp).items()}
            if metrics["train/skipped_steps"] >= self.updates_per_step:
                reason = "every optimizer step was vetoed by the learners (non-finite loss or gradient)"
        return metrics | self.record(step, reason)

    def record(self, step: int, reason: str | None) -> dict[str, float]:
        """Count one RL step (skipped when `reason` is given); raise TooManySkippedSteps at the limit."""
        self.applied = reason is None
        self.consecutive = 0 if reason is None else self.consecutive + 1
        if reason is not None:
            log.warning("step %d: update skipped, weights unchanged (%s); %d in a row, the run stops at %d",
                        step, reason, self.consecutive, self.max_consecutive_skips)
        if self.consecutive >= self.max_consecutive_skips:
            last = latest_complete(self.checkpoint_root) if self.checkpoint_root is not None else None
            raise TooManySkippedSteps(
                f"step {step}: {self.consecutive} RL steps in a row skipped their update "
                f"(learner.max_consecutive_skips={self.max_consecutive_skips}); last cause: {reason}. "
                f"The skipped steps left the weights unchanged; the newest complete checkpoint is "
                f"{last or 'none (nothing saved yet)'}. Fix: find the cause (learner.lr too high, a reward function or reward model "
                "returning garbage, bad data), then `rlhf-ray train ... --resume`; or raise learner.max_consecutive_skips"
            )
        return {"train/consecutive_skips": float(self.consecutive)}
