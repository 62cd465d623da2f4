"""DAPO dynamic sampling: groups with equal rewards dropped, the batch refilled from more prompts, metrics logged."""

from __future__ import annotations

import pytest
import torch

from rlhf_ray.driver.dynamic_sampling import ScoredRollout, fill_with_informative_groups
from rlhf_ray.protocol import RolloutResult, Sample


def _scored(group_scores: list[list[float]], tag: str) -> ScoredRollout:
    n = len(group_scores[0])
    samples = [Sample(g, k, [1], [2, 3], [0.0, 0.0], "stop", 0) for g in range(len(group_scores)) for k in range(n)]
    flat = [s for group in group_scores for s in group]
    return ScoredRollout(
        rows=[{"prompt": f"{tag}{g}"} for g in range(len(group_scores))],
        rollout=RolloutResult(samples, seconds=1.0),
        prompts=[f"{tag}{g}" for g in range(len(group_scores)) for _ in range(n)],
        responses=[f"{tag}{g}.{k}" for g in range(len(group_scores)) for k in range(n)],
        rewards={"scores": torch.tensor(flat, dtype=torch.float32), "valid": torch.ones(len(flat), dtype=torch.bool)},
    )


def test_uninformative_groups_are_replaced_from_more_rounds():
    first = _scored([[1, 1], [0, 1], [2, 2]], "a")  # one informative group of three
    later = iter([_scored([[3, 3], [5, 4], [0, 0]], "b"), _scored([[1, 2], [7, 7], [7, 7]], "c")])
    batch, metrics = fill_with_informative_groups(first, lambda: next(later), num_groups=3, n=2, max_rounds=5)
    # a plain walk: keep the groups whose scores differ, in the order seen, until three
    assert [r["prompt"] for r in batch.rows] == ["a1", "b1", "c0"]
    assert batch.responses == ["a1.0", "a1.1", "b1.0", "b1.1", "c0.0", "c0.1"]
    assert [s.prompt_id for s in batch.rollout.samples] == [0, 0, 1, 1, 2, 2]
    assert batch.rewards["scores"].tolist() == [0, 1, 5, 4, 1, 2] and bool(batch.rewards["valid"].all())
    assert metrics == {"rollout/dynamic_sampling_rounds": 2.0, "rollout/dynamic_sampling_dropped_groups": 6.0,
                       "rollout/dynamic_sampling_padded_groups": 0.0,
                       "reward/unfiltered_mean": pytest.approx((1 + 1 + 0 + 1 + 2 + 2) / 6)}
    assert batch.rollout.seconds == 3.0


def test_rounds_are_capped_and_the_batch_is_padded_with_invalid_groups():
    first = _scored([[1, 1], [0, 1]], "a")
    batch, metrics = fill_with_informative_groups(first, lambda: _scored([[4, 4], [4, 4]], "b"), 2, 2, max_rounds=1)
    assert [r["prompt"] for r in batch.rows] == ["a1", "a0"]
    assert batch.rewards["valid"].tolist() == [True, True, False, False]  # the filler gets no gradient
    assert metrics["rollout/dynamic_sampling_rounds"] == 1 and metrics["rollout/dynamic_sampling_padded_groups"] == 1


def test_dapo_run_through_the_real_pool_drops_and_refills(dapo_run_metrics: list[dict]):
    rows = dapo_run_metrics
    for r in rows:
        # half of every 4 prompts score the same on all samples: 2 dropped per round, at least one more round
        assert r["rollout/dynamic_sampling_rounds"] >= 1
        assert r["rollout/dynamic_sampling_dropped_groups"] >= 2 * (1 + r["rollout/dynamic_sampling_rounds"])
        padded = r["rollout/dynamic_sampling_padded_groups"]
        assert r["reward/masked_rows"] == 4 * padded
        assert "reward/overlong_penalty_mean" in r and "rollout/overlong_filtered" in r
