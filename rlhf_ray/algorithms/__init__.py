"""Pure-torch RLHF algorithms: advantages, losses, KL estimation and numeric guards."""

from .advantages import (
    broadcast_sequence_advantage,
    check_right_padded,
    gae_advantages,
    group_baseline_scores,
    grpo_advantages,
    informative_groups,
    overlong_penalty,
    reinforce_pp_advantages,
    rloo_advantages,
    token_level_rewards,
)
from .guards import all_finite, first_nonfinite
from .kl import AdaptiveKLController, FixedKLController, kl_estimate
from .losses import (
    K3_CLAMP,
    LOG_RATIO_CLAMP,
    aggregate,
    gspo_policy_loss,
    entropy_from_logits,
    logprobs_from_logits,
    pairwise_rm_loss,
    policy_loss,
    sft_loss,
    truncated_importance_weight,
    value_loss,
)
from .masked import masked_mean, masked_sum, masked_var, masked_whiten

__all__ = [
    "AdaptiveKLController",
    "FixedKLController",
    "aggregate",
    "all_finite",
    "K3_CLAMP",
    "LOG_RATIO_CLAMP",
    "broadcast_sequence_advantage",
    "check_right_padded",
    "group_baseline_scores",
    "gspo_policy_loss",
    "informative_groups",
    "overlong_penalty",
    "entropy_from_logits",
    "first_nonfinite",
    "gae_advantages",
    "grpo_advantages",
    "kl_estimate",
    "logprobs_from_logits",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "pairwise_rm_loss",
    "policy_loss",
    "reinforce_pp_advantages",
    "rloo_advantages",
    "sft_loss",
    "token_level_rewards",
    "truncated_importance_weight",
    "value_loss",
]
