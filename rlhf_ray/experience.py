"""From scored rollouts to training experience: KL, advantages and returns for each algorithm."""

from __future__ import annotations

import torch

from rlhf_ray.algorithms import (
    broadcast_sequence_advantage,
    gae_advantages,
    group_baseline_scores,
    grpo_advantages,
    kl_estimate,
    masked_mean,
    masked_whiten,
    overlong_penalty,
    reinforce_pp_advantages,
    rloo_advantages,
    token_level_rewards,
)
from rlhf_ray.config import AlgorithmConfig
from rlhf_ray.protocol import Experience, RolloutBatch


@torch.no_grad()
def make_experience(
    batch: RolloutBatch,
    scores: torch.Tensor,
    old_logprobs: torch.Tensor | None,
    ref_logprobs: torch.Tensor,
    values: torch.Tensor | None,
    algo: AlgorithmConfig,
    kl_coef: float,
    group_size: int,
    valid: torch.Tensor | None = None,
    truncated: torch.Tensor | None = None,
    max_new_tokens: int | None = None,
) -> tuple[Experience, dict[str, float]]:
    """Score a collated batch: the `protocol.Experience` the update trains on, and the step's kl/ metrics.

    batch: `protocol.collate` output; its response_mask [N, R] marks response tokens.
    scores: [N] combined reward per sequence.
    old_logprobs: [N, R] the learner's log-probs of the sampled tokens (nats), or None when the
    update takes its own (one on-policy optimizer step): the KL to the reference is then measured
    from the rollout engine's log-probs, `batch["rollout_logprobs"]`.
    ref_logprobs: [N, R] the reference policy's, nats.
    values: [N, R] critic values (PPO only), else None.
    kl_coef: current KL coefficient. group_size: samples per prompt (rows of a group are contiguous).
    valid: [N] bool, False where the reward failed: such a row gets advantage 0, stays out of group
    baselines and whitening statistics, and leaves the loss altogether: its response_mask in the
    experience is 0, so it is in neither the token-mean denominator nor the critic's targets.
    truncated: [N] bool, True for responses cut at max_new_tokens; with algo.overlong_filter they
    are treated like failed rows (DAPO overlong filtering).
    max_new_tokens: the generation limit, needed by algo.overlong_buffer (DAPO soft overlong penalty,
    added to `scores`).
    KL placement is decided here, once: with algorithm.kl.placement "reward" the KL enters the
    token rewards and the experience's kl_coef (the loss's weight) is 0; with "loss" the rewards
    hold no KL and kl_coef is the controller's value. Metrics in nats.
    """
    mask = batch["response_mask"]
    if valid is None:
        valid = torch.ones(mask.shape[0], dtype=torch.bool)
    metrics: dict[str, float] = {}
    if algo.overlong_filter and truncated is not None:
        valid = valid & ~truncated
        metrics["rollout/overlong_filtered"] = float(truncated.sum())
    if algo.overlong_buffer:
        if max_new_tokens is None:
            raise ValueError("algorithm.overlong_buffer needs make_experience(max_new_tokens=sampling.max_new_tokens)")
        penalty = overlong_penalty(mask.sum(-1), max_new_tokens, algo.overlong_buffer, algo.overlong_penalty)
        scores = scores + penalty
        metrics["reward/overlong_penalty_mean"] = float(penalty.mean())
    adv_mask = mask * valid.unsqueeze(-1).to(mask.dtype)  # response tokens of rows with a reward
    policy_logprobs = batch["rollout_logprobs"] if old_logprobs is None else old_logprobs
    kl = kl_estimate(policy_logprobs, ref_logprobs, algo.kl.estimator, algo.log_ratio_clamp, algo.kl.clamp) * mask
    kl_per_seq = kl.sum(-1)
    in_reward = algo.kl.placement == "reward"
    rewards = token_level_rewards(scores, kl, mask, kl_coef if in_reward else 0.0)

    if algo.name == "ppo":
        if values is None:
            raise ValueError("algorithm.name=ppo needs critic values")
        advantages, returns = gae_advantages(rewards, values, mask, algo.gamma, algo.lam)
        returns = torch.where(valid.unsqueeze(-1), returns, values)
        critic = {"returns": returns, "old_values": values}
        if algo.whiten_advantages:
            advantages = masked_whiten(advantages, adv_mask)
    elif algo.name == "reinforce_pp":
        advantages = reinforce_pp_advantages(rewards, adv_mask, algo.gamma)
    elif algo.name == "reinforce_pp_baseline":
        centred = group_baseline_scores(scores, group_size, valid)
        centred_rewards = token_level_rewards(centred, kl, mask, kl_coef if in_reward else 0.0)
        advantages = reinforce_pp_advantages(centred_rewards, adv_mask, algo.gamma)
    else:
        # Group baselines work on sequence rewards; a KL in the reward enters as its per-sequence sum.
        seq_rewards = rewards.sum(-1)
        if algo.name == "rloo":
            seq_adv = rloo_advantages(seq_rewards, group_size, valid=valid)
        else:  # the GRPO family: grpo, dr_grpo, dapo, gspo
            seq_adv = grpo_advantages(seq_rewards, group_size, algo.grpo_normalize_std, algo.grpo_std_eps, valid=valid)
        advantages = broadcast_sequence_advantage(seq_adv, mask)
    exp = Experience(
        **batch,
        old_logprobs=old_logprobs,
        ref_logprobs=ref_logprobs,
        advantages=advantages * adv_mask,
        kl_coef=torch.tensor(0.0 if in_reward else kl_coef),
    )
    exp["response_mask"] = adv_mask  # failed rows leave the loss, its denominator and the critic's targets
    if algo.name == "ppo":
        exp.update(critic)

    metrics |= {
        "kl/mean": float(kl_per_seq.mean()),
        "kl/per_token": float(masked_mean(kl, mask)),
        "kl/coef": float(kl_coef),
        "train/advantage_mean": float(masked_mean(advantages, adv_mask)) if adv_mask.any() else 0.0,
    }
    if values is not None:
        metrics["train/value_mean"] = float(masked_mean(values, mask))
    return exp, metrics
