"""DAPO dynamic sampling: keep only prompt groups whose rewards differ, and generate more until the batch is full.

A group whose n samples all score the same has advantage 0 under any group baseline and gives no
gradient; DAPO (Yu et al. 2025) drops such groups and samples further prompts until the step has
`train.prompts_per_step` informative ones, at most `algorithm.dynamic_sampling_max_rounds` extra
rounds. If the rounds run out, the batch is topped up with dropped groups marked invalid (no
gradient, like failed rewards), so every step keeps its shape.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import torch

from rlhf_ray.algorithms import informative_groups
from rlhf_ray.driver.step_guard import guard_rewards
from rlhf_ray.protocol import RolloutResult


@dataclass
class ScoredRollout:
    """One step's samples with their prompt rows, texts and rewards; sample.prompt_id indexes rows."""

    rows: list[dict[str, Any]]
    rollout: RolloutResult
    prompts: list[str]  # per sample
    responses: list[str]  # per sample, decoded
    rewards: dict[str, torch.Tensor]  # each [N], "scores" and "valid" among them

    @property
    def num_groups(self) -> int:
        return len(self.rows)


def score_rollout(c: Any, rows: list[dict[str, Any]], rollout: RolloutResult) -> ScoredRollout:
    """Decode the responses and score them with the run's reward actor (non-finite scores masked)."""
    samples = rollout.samples
    responses = c.tokenizer.batch_decode([s.response_ids for s in samples], skip_special_tokens=True)
    prompts = [rows[s.prompt_id]["prompt"] for s in samples]
    sample_rows = [rows[s.prompt_id] for s in samples]
    rewards = c.reward.score([s.prompt_ids + s.response_ids for s in samples], prompts, responses, sample_rows)
    return ScoredRollout(rows, rollout, prompts, responses, guard_rewards(rewards, len(samples)))


def select_groups(
    scored: ScoredRollout, groups: list[int], n: int, invalid: frozenset[int] | set[int] = frozenset()
) -> ScoredRollout:
    """The prompt groups `groups` (in that order) of a rollout whose samples are n per prompt, contiguous.

    Prompt ids are renumbered 0.. in the new order; groups in `invalid` get valid False (no gradient).
    """
    rows, samples, idx = [], [], []
    for new_id, g in enumerate(groups):
        rows.append(scored.rows[g])
        group = list(range(g * n, (g + 1) * n))
        samples += [dataclasses.replace(scored.rollout.samples[i], prompt_id=new_id) for i in group]
        idx += group
    take = torch.tensor(idx, dtype=torch.long)
    rewards = {k: v[take] for k, v in scored.rewards.items()}
    if invalid:
        off = torch.tensor([g in invalid for g in groups]).repeat_interleave(n)
        rewards["valid"] = rewards["valid"] & ~off
    rollout = dataclasses.replace(scored.rollout, samples=samples)
    return ScoredRollout(rows, rollout, [scored.prompts[i] for i in idx], [scored.responses[i] for i in idx], rewards)


def concat(a: ScoredRollout, b: ScoredRollout) -> ScoredRollout:
    """a's groups then b's (b's prompt ids shifted past a's); generation seconds and failures add up."""
    shift = a.num_groups
    samples = a.rollout.samples + [dataclasses.replace(s, prompt_id=s.prompt_id + shift) for s in b.rollout.samples]
    rollout = RolloutResult(
        samples, {**a.rollout.tokens_per_s, **b.rollout.tokens_per_s}, a.rollout.seconds + b.rollout.seconds,
        a.rollout.failures + b.rollout.failures,
    )
    rewards = {k: torch.cat([a.rewards[k], b.rewards[k]]) for k in a.rewards if k in b.rewards}
    return ScoredRollout(a.rows + b.rows, rollout, a.prompts + b.prompts, a.responses + b.responses, rewards)


def fill_with_informative_groups(
    first: ScoredRollout, more: Callable[[], ScoredRollout], num_groups: int, n: int, max_rounds: int
) -> tuple[ScoredRollout, dict[str, float]]:
    """Keep `num_groups` groups whose valid rewards differ, calling `more()` for fresh prompts up to max_rounds times.

    Returns the batch (num_groups groups, informative first; topped up with dropped groups marked
    invalid when the rounds ran out) and the metrics rollout/dynamic_sampling_rounds (extra rounds),
    _dropped_groups (groups without signal seen this step) and _padded_groups (invalid fillers), and
    reward/unfiltered_mean: the mean score of `first` (the usual batch, before any group is dropped;
    the kept batch's reward/mean is biased towards groups with mixed rewards).
    """
    unfiltered = float(first.rewards["scores"].float().mean())
    pool, rounds = first, 0
    while True:
        keep = informative_groups(pool.rewards["scores"], n, pool.rewards["valid"]).tolist()
        good = [g for g, k in enumerate(keep) if k]
        if len(good) >= num_groups or rounds >= max_rounds:
            break
        pool, rounds = concat(pool, more()), rounds + 1
    dropped = [g for g, k in enumerate(keep) if not k]
    padding = dropped[: max(0, num_groups - len(good))]
    batch = select_groups(pool, good[:num_groups] + padding, n, invalid=set(padding))
    return batch, {
        "rollout/dynamic_sampling_rounds": float(rounds),
        "rollout/dynamic_sampling_dropped_groups": float(len(dropped)),
        "rollout/dynamic_sampling_padded_groups": float(len(padding)),
        "reward/unfiltered_mean": unfiltered,
    }
