"""Policy, value, supervised and reward-model losses, plus logit utilities."""

from typing import Literal

import torch
import torch.nn.functional as F

from ._checks import _check_same_shape
from .masked import masked_mean, masked_sum

Aggregation = Literal["token_mean", "token_sum", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm"]

# Peers' bounds (OpenRLHF, veRL): exp(20) ~ 5e8 keeps a ratio finite in fp32 and its loss bounded;
# a k3 value above 10 nats/token is a policy far off the reference, and its gradient 1 - exp(-x) explodes.
LOG_RATIO_CLAMP = 20.0
K3_CLAMP = 10.0


def aggregate(loss: torch.Tensor, mask: torch.Tensor, mode: Aggregation, norm_len: int | None = None) -> torch.Tensor:
    """Reduce a per-token loss to a scalar.

    loss: [B, T] per-token loss. mask: [B, T] 1 for response tokens.
    mode: "token_mean" = sum over all response tokens / their count (DAPO's token-level loss);
        "token_sum" = sum over all response tokens, no normaliser (grows with the token count);
        "seq_mean_token_mean" = mean over rows of each row's token mean (GRPO's original);
        "seq_mean_token_sum" = mean over rows of each row's token sum;
        "seq_mean_token_sum_norm" = sum over all response tokens / (B * norm_len), a constant
        normaliser independent of response lengths (Dr. GRPO); norm_len None uses T.
    A row with no response tokens contributes 0 to the seq_mean modes.
    """
    _check_same_shape(loss=loss, mask=mask)
    if mode == "token_mean":
        return masked_mean(loss, mask)
    if mode == "token_sum":
        return masked_sum(loss, mask)
    if mode == "seq_mean_token_mean":
        return masked_mean(loss, mask, dim=-1).mean()
    if mode == "seq_mean_token_sum":
        return masked_sum(loss, mask, dim=-1).mean()
    if mode == "seq_mean_token_sum_norm":
        length = mask.shape[-1] if norm_len is None else norm_len
        if length < 1:
            raise ValueError(f"norm_len must be >= 1 token, got {length}; set algorithm.loss_norm_len to the max response length")
        return masked_sum(loss, mask) / (mask.shape[0] * length)
    raise ValueError(f"unknown aggregation mode {mode!r}")


def masked_log_ratio(
    logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor, clamp: float | None = LOG_RATIO_CLAMP
) -> torch.Tensor:
    """logp - old_logp [B, T], 0 outside the mask (so exp() there is 1 and no gradient reaches it),
    clamped to [-clamp, clamp] when clamp is set (no gradient beyond the bound)."""
    log_ratio = torch.where(mask.bool(), logp - old_logp, torch.zeros_like(logp))
    return log_ratio if clamp is None else log_ratio.clamp(-clamp, clamp)


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    is_weight: torch.Tensor | None = None,
    agg: Aggregation = "token_mean",
    log_ratio_clamp: float | None = LOG_RATIO_CLAMP,
    norm_len: int | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO clipped surrogate loss (Schulman et al. 2017), optionally dual-clipped (Ye et al. 2020).

    logp: [B, T] log-probabilities of the sampled tokens under the current policy, nats.
    old_logp: [B, T] the same under the policy that produced the advantages, nats.
    advantages: [B, T]. mask: [B, T] 1 for response tokens.
    clip_low, clip_high: the ratio is clipped to [1 - clip_low, 1 + clip_high].
    dual_clip: if set (> 1), the loss of tokens with negative advantage is capped at
        -dual_clip * A, so one huge ratio cannot dominate the update.
    is_weight: [B, T] optional importance weight multiplying the per-token loss,
        e.g. truncated_importance_weight; treated as a constant.
    agg, norm_len: how the per-token loss is reduced, see aggregate.
    log_ratio_clamp: bound on |logp - old_logp| before exp (None: unbounded).
    Entries outside the mask never reach the loss or the gradients, even if they hold inf/NaN.
    Returns (scalar loss, metrics) with metrics as Python floats over response tokens:
    clipfrac (fraction where the clipped term is active), approx_kl (k3 estimate of
    KL(old || current), nats per token), ppo_kl (k1: mean of old_logp - logp, nats per token),
    ratio_mean, ratio_max.
    """
    _check_same_shape(logp=logp, old_logp=old_logp, advantages=advantages, mask=mask)
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")

    keep = mask.bool()
    advantages = torch.where(keep, advantages, torch.zeros_like(advantages))
    log_ratio = masked_log_ratio(logp, old_logp, mask, log_ratio_clamp)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    if dual_clip is not None:
        capped = torch.minimum(loss, -dual_clip * advantages)
        loss = torch.where(advantages < 0, capped, loss)
    if is_weight is not None:
        _check_same_shape(is_weight=is_weight, mask=mask)
        loss = loss * torch.where(keep, is_weight.detach(), torch.zeros_like(is_weight))

    with torch.no_grad():
        metrics = {
            "clipfrac": masked_mean((clipped > unclipped).to(loss.dtype), mask).item(),
            "approx_kl": masked_mean(ratio - 1.0 - log_ratio, mask).item(),
            "ppo_kl": masked_mean(-log_ratio, mask).item(),
            "ratio_mean": masked_mean(ratio, mask).item(),
            "ratio_max": ratio[keep].max().item() if keep.any() else 0.0,
        }
    return aggregate(loss, mask, agg, norm_len), metrics


def gspo_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 3e-4,
    clip_high: float = 4e-4,
    is_weight: torch.Tensor | None = None,
    log_ratio_clamp: float | None = LOG_RATIO_CLAMP,
) -> tuple[torch.Tensor, dict[str, float]]:
    """GSPO: sequence-level importance ratio and clipping (Zheng et al. 2025, "Group Sequence Policy Optimization").

    logp, old_logp: [B, T] log-probs of the sampled tokens, current and rollout-time policy, nats.
    advantages: [B, T], constant along each row (a sequence advantage, e.g. GRPO's). mask: [B, T].
    The ratio of row i is s_i = exp(mean over its tokens of (logp - old_logp)), the geometric mean
    of its token ratios; loss_i = max(-A_i s_i, -A_i clip(s_i, 1 - clip_low, 1 + clip_high)),
    averaged over rows with at least one token. is_weight: [B, T] optional constant weight, its
    token mean multiplies each row's loss. Returns (scalar loss, {clipfrac: fraction of rows clipped,
    ratio_mean, ratio_max over those rows}).
    """
    _check_same_shape(logp=logp, old_logp=old_logp, advantages=advantages, mask=mask)
    keep = mask.bool()
    rows = keep.any(dim=-1)
    log_ratio = masked_mean(masked_log_ratio(logp, old_logp, mask, log_ratio_clamp), mask, dim=-1)
    ratio = torch.exp(log_ratio)
    seq_adv = masked_mean(torch.where(keep, advantages, torch.zeros_like(advantages)), mask, dim=-1)
    unclipped = -seq_adv * ratio
    clipped = -seq_adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    if is_weight is not None:
        _check_same_shape(is_weight=is_weight, mask=mask)
        loss = loss * masked_mean(torch.where(keep, is_weight.detach(), torch.zeros_like(is_weight)), mask, dim=-1)
    rows_f = rows.to(loss.dtype)
    with torch.no_grad():
        metrics = {
            "clipfrac": masked_mean((clipped > unclipped).to(loss.dtype), rows_f).item(),
            "ratio_mean": masked_mean(ratio, rows_f).item(),
            "ratio_max": ratio[rows].max().item() if rows.any() else 0.0,
        }
    return masked_mean(loss, rows_f), metrics


@torch.no_grad()
def truncated_importance_weight(
    learner_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor, cap: float
) -> torch.Tensor:
    """Truncated importance weight pi_learner / pi_rollout (TIS, Yao et al. 2025).

    Corrects for the mismatch between the inference engine that sampled the tokens
    and the learner's own forward pass of the same weights.
    learner_logp: [B, T] log-probs of the sampled tokens from the learner, nats.
    rollout_logp: [B, T] log-probs reported by the rollout engine, nats.
    mask: [B, T] 1 for response tokens. cap: upper bound on the weight (> 0).
    Returns [B, T] min(exp(learner_logp - rollout_logp), cap), 0 outside the mask, detached.
    """
    _check_same_shape(learner_logp=learner_logp, rollout_logp=rollout_logp, mask=mask)
    if cap <= 0:
        raise ValueError(f"cap must be > 0, got {cap}")
    weight = torch.exp(learner_logp - rollout_logp).clamp(max=cap)
    return weight.masked_fill(~mask.bool(), 0.0)


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float | None = None,
    agg: Aggregation = "token_mean",
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped value-function loss 0.5 * max((v - R)^2, (clip(v, old - c, old + c) - R)^2).

    values: [B, T] current value predictions. old_values: [B, T] predictions at rollout time.
    returns: [B, T] value targets. mask: [B, T] 1 for response tokens.
    clip: c above; None disables clipping (plain 0.5 * squared error).
    Returns (scalar loss, {"clipfrac": fraction of response tokens where the clipped
    term is the larger one}).
    """
    _check_same_shape(values=values, old_values=old_values, returns=returns, mask=mask)
    unclipped = (values - returns) ** 2
    if clip is None:
        return aggregate(0.5 * unclipped, mask, agg), {"clipfrac": 0.0}
    values_clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    clipped = (values_clipped - returns) ** 2
    loss = 0.5 * torch.maximum(unclipped, clipped)
    clipfrac = masked_mean((clipped > unclipped).to(loss.dtype), mask).item()
    return aggregate(loss, mask, agg), {"clipfrac": clipfrac}


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the softmax distribution at each position.

    logits: [B, T, V] finite unnormalised log-probabilities. Returns [B, T] entropy in nats.
    """
    # H = logsumexp(z) - sum_v p_v z_v, which never exponentiates an unshifted logit.
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(dim=-1)


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Log-probability of the given tokens under softmax(logits).

    logits: [B, T, V]. tokens: [B, T] integer token ids.
    Returns [B, T] log-probabilities, nats. Avoids materialising a second [B, T, V]
    tensor of log_softmax.
    """
    _check_same_shape(logits_leading_dims=logits.shape[:-1], tokens=tokens)
    picked = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def sft_loss(logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Supervised fine-tuning loss: mean negative log-likelihood over response tokens.

    logp: [B, T] log-probabilities of the target tokens, nats. mask: [B, T] 1 for response tokens.
    Returns a scalar in nats per token.
    """
    return -masked_mean(logp, mask)


def pairwise_rm_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None
) -> tuple[torch.Tensor, dict[str, float]]:
    """Bradley-Terry reward-model loss -log sigmoid(r_chosen - r_rejected - margin).

    chosen, rejected: [B] scalar rewards of the preferred and dispreferred responses.
    margin: [B] optional required reward gap (Llama 2 style).
    Returns (scalar loss, {"accuracy": fraction with chosen > rejected,
    "margin_mean": mean of chosen - rejected}).
    """
    _check_same_shape(chosen=chosen, rejected=rejected)
    diff = chosen - rejected
    if margin is not None:
        _check_same_shape(chosen=chosen, margin=margin)
        diff = diff - margin
    loss = -F.logsigmoid(diff).mean()
    with torch.no_grad():
        metrics = {
            "accuracy": (chosen > rejected).float().mean().item(),
            "margin_mean": (chosen - rejected).mean().item(),
        }
    return loss, metrics
