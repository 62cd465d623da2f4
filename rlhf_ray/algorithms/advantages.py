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
    check_right_padded(mask)
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


def check_right_padded(mask: torch.Tensor) -> None:
    """Raise unless each row of mask [B, T] is ones then zeros (response tokens a prefix, right padding)."""
    gaps = (mask[:, 1:].bool() & ~mask[:, :-1].bool()).any(dim=-1)
    if gaps.any():
        rows = gaps.nonzero().flatten().tolist()
        raise ValueError(
            f"response_mask rows {rows} have a gap before a later response token; returns are computed "
            "back from each row's end and need right padding (every row: 1s, then 0s)"
        )


def _groups(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """View [B*n] scores as [B, n]; samples of one prompt are contiguous."""
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D [B*n], got shape {tuple(scores.shape)}")
    if group_size < 1 or scores.numel() % group_size != 0:
        raise ValueError(f"{scores.numel()} scores cannot be split into groups of {group_size}")
    return scores.view(-1, group_size)


def _valid_groups(scores: torch.Tensor, group_size: int, valid: torch.Tensor | None) -> torch.Tensor:
    """[B, n] float: 1 for rows that count toward their group's baseline, 0 for masked ones."""
    if valid is None:
        return torch.ones_like(scores).view(-1, group_size)
    if valid.shape != scores.shape:
        raise ValueError(f"valid must have the shape of scores {tuple(scores.shape)}, got {tuple(valid.shape)}")
    return valid.to(scores.dtype).view(-1, group_size)


@torch.no_grad()
def grpo_advantages(
    scores: torch.Tensor, group_size: int, normalize_std: bool = True, eps: float = 1e-6,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Group-relative advantages (GRPO, Shao et al. 2024): score minus its group's mean.

    scores: [B*n] sequence scores; rows [i*n:(i+1)*n] are the n samples of prompt i.
    group_size: n. normalize_std: also divide by the group's (unbiased) std + eps.
    valid: [B*n] bool, False for rows whose reward failed: they get advantage 0 and are left out of
    their group's mean and std. Returns [B*n]. A group with fewer than two valid rows, or whose
    valid scores are all equal, gets advantage 0.
    """
    groups = _groups(scores, group_size)
    if group_size == 1:
        return torch.zeros_like(scores)
    v = _valid_groups(scores, group_size, valid)
    count = v.sum(dim=-1, keepdim=True)
    mean = (groups * v).sum(dim=-1, keepdim=True) / count.clamp(min=1)
    advantages = (groups - mean) * v
    if normalize_std:
        var = (advantages**2).sum(dim=-1, keepdim=True) / (count - 1).clamp(min=1)
        advantages = advantages / (var.sqrt() + eps)
    return advantages.reshape(-1)


@torch.no_grad()
def rloo_advantages(scores: torch.Tensor, group_size: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """REINFORCE leave-one-out advantages (Ahmadian et al. 2024).

    scores: [B*n] sequence scores; rows [i*n:(i+1)*n] are the n samples of prompt i.
    group_size: n >= 2. valid: [B*n] bool, False for rows whose reward failed (advantage 0, and
    not part of any baseline). Returns [B*n]: each score minus the mean of the other valid rows of
    its group; 0 where a row has no valid other.
    """
    if group_size < 2:
        raise ValueError(f"RLOO needs group_size >= 2 to leave one sample out, got {group_size}")
    groups = _groups(scores, group_size)
    v = _valid_groups(scores, group_size, valid)
    others = v.sum(dim=-1, keepdim=True) - v
    baseline = ((groups * v).sum(dim=-1, keepdim=True) - groups * v) / others.clamp(min=1)
    return ((groups - baseline) * v * (others > 0)).reshape(-1)


@torch.no_grad()
def reinforce_pp_advantages(
    rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0
) -> torch.Tensor:
    """REINFORCE++ advantages (Hu 2025): discounted return-to-go, whitened over the batch.

    rewards: [B, T] per-token rewards (typically from token_level_rewards).
    mask: [B, T] 1 for response tokens, a prefix of each row. gamma: discount per token.
    Returns [B, T], zero mean and unit variance over masked-in tokens, 0 outside the mask
    (0 everywhere when fewer than two tokens are masked in).
    """
    _check_same_shape(rewards=rewards, mask=mask)
    check_right_padded(mask)
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


@torch.no_grad()
def group_baseline_scores(scores: torch.Tensor, group_size: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Each score minus the mean of its group's valid scores (REINFORCE++ with a group baseline, as in
    veRL's reinforce_plus_plus_baseline; the whitening over the batch follows in reinforce_pp_advantages).

    scores: [B*n], rows [i*n:(i+1)*n] the samples of prompt i. valid: [B*n] bool, False rows get 0
    and stay out of the mean. Returns [B*n].
    """
    groups = _groups(scores, group_size)
    v = _valid_groups(scores, group_size, valid)
    mean = (groups * v).sum(dim=-1, keepdim=True) / v.sum(dim=-1, keepdim=True).clamp(min=1)
    return ((groups - mean) * v).reshape(-1)


@torch.no_grad()
def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer: int, penalty: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025): a reward term for responses near the length limit.

    lengths: [N] response lengths in tokens. max_len: the generation limit (sampling.max_new_tokens).
    buffer: the last `buffer` tokens before max_len over which the penalty grows linearly.
    Returns [N]: 0 up to max_len - buffer, then -penalty * (length - (max_len - buffer)) / buffer,
    reaching -penalty at max_len.
    """
    if buffer < 1 or buffer > max_len:
        raise ValueError(f"overlong buffer must be in [1, max_len={max_len}] tokens, got {buffer}")
    start = max_len - buffer
    return -penalty * ((lengths.float() - start).clamp(min=0, max=buffer) / buffer)


@torch.no_grad()
def informative_groups(scores: torch.Tensor, group_size: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """DAPO dynamic sampling: [B] bool, True for prompt groups whose valid scores are not all equal.

    A group whose samples all score the same has advantage 0 for every sample under any group
    baseline, so it contributes no gradient; a group with fewer than two valid rows likewise.
    scores: [B*n]; valid: [B*n] bool or None.
    """
    groups = _groups(scores.double(), group_size)
    v = _valid_groups(scores.double(), group_size, valid).bool()
    high = torch.where(v, groups, torch.full_like(groups, -torch.inf)).max(dim=-1).values
    low = torch.where(v, groups, torch.full_like(groups, torch.inf)).min(dim=-1).values
    return (v.sum(dim=-1) >= 2) & (high > low)
