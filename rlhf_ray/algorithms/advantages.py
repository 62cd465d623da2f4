"""Per-token rewards and advantage estimators: GAE, GRPO, RLOO, REINFORCE++.

All functions run without autograd: rewards and advantages are targets, not outputs.
"""

import torch

from ._checks import _check_same_shape
from .masked import masked_whiten


@torch.no_grad()
def token_level_rewards(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> torch.Tensor:
    """Per-token rewards with the KL penalty folded in (InstructGPT-style PPO).

    scores: [B] sequence-level reward-model scores.
    kl: [B, T] per-token KL estimate between policy and reference, nats.
    mask: [B, T] 1 for response tokens.
    kl_coef: weight of the KL penalty.
    Returns [B, T]: -kl_coef * kl on every response token, plus the score on the last
    response token of each row; 0 outside the mask.
    """
    _check_same_shape(kl=kl, mask=mask)
    _check_same_shape(scores=scores.shape, mask_rows=mask.shape[:1])
    keep = mask.bool()
    if not keep.any(dim=-1).all():
        empty = (~keep.any(dim=-1)).nonzero().flatten().tolist()
        raise ValueError(
            f"rows {empty} have a zero-length response: every row needs at least one response token in mask "
            "(an immediate stop still returns its EOS token, so this is a broken rollout)"
        )
    rewards = (-kl_coef * kl).masked_fill(~keep, 0.0)
    positions = torch.arange(mask.shape[-1], device=mask.device)
    last = (keep * positions).argmax(dim=-1, keepdim=True)
    return rewards.scatter_add(-1, last, scores.to(rewards.dtype).unsqueeze(-1))


@torch.no_grad()
def gae_advantages(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016).

    rewards: [B, T] per-token rewards. values: [B, T] value estimates V(s_t).
    mask: [B, T] 1 for response tokens; response tokens must be a prefix of each row
        (right padding). The state after the last response token is terminal (V = 0).
    gamma: discount per token. lam: GAE lambda.
    Returns (advantages, returns), both [B, T] and 0 outside the mask;
    returns = advantages + values are the value-function targets.
    """
    _check_same_shape(rewards=rewards, values=values, mask=mask)
    pad = ~mask.bool()
    rewards = rewards.masked_fill(pad, 0.0)
    values = values.masked_fill(pad, 0.0)
    next_values = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], dim=-1)
    deltas = rewards + gamma * next_values - values

    last_gae = torch.zeros_like(deltas[:, 0])
    advantages = torch.zeros_like(deltas)
    for t in reversed(range(deltas.shape[-1])):
        last_gae = deltas[:, t] + gamma * lam * last_gae
        advantages[:, t] = last_gae
    advantages = advantages.masked_fill(pad, 0.0)
    returns = (advantages + values).masked_fill(pad, 0.0)
    return advantages, returns


def _groups(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """View [B*n] scores as [B, n]; samples of one prompt are contiguous."""
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D [B*n], got shape {tuple(scores.shape)}")
    if group_size < 1 or scores.numel() % group_size != 0:
        raise ValueError(f"{scores.numel()} scores cannot be split into groups of {group_size}")
    return scores.view(-1, group_size)


@torch.no_grad()
def grpo_advantages(
    scores: torch.Tensor, group_size: int, normalize_std: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """Group-relative advantages (GRPO, Shao et al. 2024): score minus its group's mean.

    scores: [B*n] sequence scores; rows [i*n:(i+1)*n] are the n samples of prompt i.
    group_size: n. normalize_std: also divide by the group's (unbiased) std + eps.
    Returns [B*n]. A group of size 1, or whose scores are all equal, gets advantage 0.
    """
    groups = _groups(scores, group_size)
    if group_size == 1:
        return torch.zeros_like(scores)
    advantages = groups - groups.mean(dim=-1, keepdim=True)
    if normalize_std:
        advantages = advantages / (groups.std(dim=-1, keepdim=True) + eps)
    return advantages.reshape(-1)


@torch.no_grad()
def rloo_advantages(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """REINFORCE leave-one-out advantages (Ahmadian et al. 2024).

    scores: [B*n] sequence scores; rows [i*n:(i+1)*n] are the n samples of prompt i.
    group_size: n >= 2. Returns [B*n]: each score minus the mean of the other n-1 in its group.
    """
    if group_size < 2:
        raise ValueError(f"RLOO needs group_size >= 2 to leave one sample out, got {group_size}")
    groups = _groups(scores, group_size)
    baseline = (groups.sum(dim=-1, keepdim=True) - groups) / (group_size - 1)
    return (groups - baseline).reshape(-1)


@torch.no_grad()
def reinforce_pp_advantages(
    rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0
) -> torch.Tensor:
    """REINFORCE++ advantages (Hu 2025): discounted return-to-go, whitened over the batch.

    rewards: [B, T] per-token rewards (typically from token_level_rewards).
    mask: [B, T] 1 for response tokens, a prefix of each row. gamma: discount per token.
    Returns [B, T], zero mean and unit variance over masked-in tokens, 0 outside the mask.
    """
    _check_same_shape(rewards=rewards, mask=mask)
    rewards = rewards.masked_fill(~mask.bool(), 0.0)
    running = torch.zeros_like(rewards[:, 0])
    returns = torch.zeros_like(rewards)
    for t in reversed(range(rewards.shape[-1])):
        running = rewards[:, t] + gamma * running
        returns[:, t] = running
    return masked_whiten(returns, mask)


def broadcast_sequence_advantage(adv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Give every response token its sequence's advantage.

    adv: [B] per-sequence advantages. mask: [B, T] 1 for response tokens.
    Returns [B, T]: adv[b] on response tokens of row b, 0 elsewhere.
    """
    _check_same_shape(adv=adv.shape, mask_rows=mask.shape[:1])
    return adv.unsqueeze(-1).expand_as(mask).masked_fill(~mask.bool(), 0.0)
