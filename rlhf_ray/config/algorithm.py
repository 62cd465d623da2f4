"""Config sections of the RL objective: the algorithm, its presets, and the KL penalty."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from rlhf_ray.config.base import Section


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
