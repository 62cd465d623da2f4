"""Tests for rlhf_ray.algorithms against independent plain-Python references."""

import json
import math
import statistics

import pytest
import torch

from rlhf_ray.algorithms import (
    AdaptiveKLController,
    FixedKLController,
    aggregate,
    all_finite,
    broadcast_sequence_advantage,
    entropy_from_logits,
    first_nonfinite,
    gae_advantages,
    grpo_advantages,
    kl_estimate,
    logprobs_from_logits,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    pairwise_rm_loss,
    policy_loss,
    reinforce_pp_advantages,
    rloo_advantages,
    sft_loss,
    token_level_rewards,
    truncated_importance_weight,
    value_loss,
)

F64 = torch.float64
TOL = 1e-6


def t(x: object) -> torch.Tensor:
    return torch.tensor(x, dtype=F64)


def right_padded_mask(lengths: list[int], seq_len: int) -> torch.Tensor:
    return t([[1.0] * n + [0.0] * (seq_len - n) for n in lengths])


def assert_close(actual: torch.Tensor, expected) -> None:
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=F64), atol=TOL, rtol=TOL)


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """x: [4, 6] random values, mask: right-padded with lengths 6, 1, 3, 5."""
    gen = torch.Generator().manual_seed(0)
    return torch.randn(4, 6, generator=gen, dtype=F64), right_padded_mask([6, 1, 3, 5], 6)


def kept(x: torch.Tensor, mask: torch.Tensor) -> list[float]:
    return [v for v, m in zip(x.flatten().tolist(), mask.flatten().tolist()) if m]


# ---------------------------------------------------------------- masked


def test_masked_reductions_match_loops(batch):
    x, mask = batch
    values = kept(x, mask)
    assert_close(masked_sum(x, mask), sum(values))
    assert_close(masked_mean(x, mask), sum(values) / len(values))
    assert_close(masked_var(x, mask), statistics.variance(values))
    assert_close(masked_var(x, mask, unbiased=False), statistics.pvariance(values))
    row_means = [statistics.fmean(kept(x[i], mask[i])) for i in range(x.shape[0])]
    assert_close(masked_mean(x, mask, dim=-1), row_means)


def test_masked_var_unbiased_needs_two_entries():
    with pytest.raises(ValueError, match="at least 2"):
        masked_var(t([1.0, 2.0]), t([1.0, 0.0]))


def test_masked_whiten_matches_loop(batch):
    x, mask = batch
    values = kept(x, mask)
    mean, std = statistics.fmean(values), statistics.stdev(values)
    expected = [[(v - mean) / std if m else 0.0 for v, m in zip(row, mrow)]
                for row, mrow in zip(x.tolist(), mask.tolist())]
    assert_close(masked_whiten(x, mask, eps=0.0), expected)
    unshifted = masked_whiten(x, mask, shift_mean=False, eps=0.0)
    assert_close(masked_mean(unshifted, mask), mean)


@pytest.mark.parametrize("fill", [1e6, float("nan"), float("inf")])
def test_masked_whiten_ignores_entries_outside_mask(batch, fill):
    x, mask = batch
    garbage = x.masked_fill(mask == 0, fill)
    assert_close(masked_whiten(garbage, mask), masked_whiten(x, mask))


# ---------------------------------------------------------------- KL


@pytest.mark.parametrize(
    "estimator, reference",
    [
        ("k1", lambda lp, rp: lp - rp),
        ("k2", lambda lp, rp: 0.5 * (lp - rp) ** 2),
        ("k3", lambda lp, rp: math.exp(rp - lp) - (rp - lp) - 1.0),
    ],
)
def test_kl_estimate_closed_forms(estimator, reference):
    logp = [[-0.1, -2.3, -0.7], [-5.0, -1e-9, -1.2]]
    ref_logp = [[-0.3, -2.3, -3.0], [-0.5, -1e-3, -1.1]]
    expected = [[reference(a, b) for a, b in zip(ra, rb)] for ra, rb in zip(logp, ref_logp)]
    assert_close(kl_estimate(t(logp), t(ref_logp), estimator), expected)


def test_kl_estimate_unknown_estimator():
    with pytest.raises(ValueError, match="k4"):
        kl_estimate(t([0.0]), t([0.0]), "k4")


def test_k3_sample_mean_approximates_exact_kl():
    pi = [0.5, 0.2, 0.15, 0.1, 0.05]
    ref = [0.2, 0.2, 0.2, 0.2, 0.2]
    exact = sum(p * math.log(p / q) for p, q in zip(pi, ref))
    gen = torch.Generator().manual_seed(0)
    samples = torch.multinomial(t(pi), 100_000, replacement=True, generator=gen)
    logp, ref_logp = t(pi).log()[samples], t(ref).log()[samples]
    estimate = kl_estimate(logp.unsqueeze(0), ref_logp.unsqueeze(0), "k3").mean().item()
    assert abs(estimate - exact) < 0.02


def test_fixed_kl_controller_never_moves():
    ctl = FixedKLController(0.05)
    ctl.update(current_kl=100.0, n_steps=1000)
    assert ctl.value == 0.05


@pytest.mark.parametrize(
    "current_kl, expected_error",
    [(6.6, 0.1), (5.4, -0.1), (60.0, 0.2), (0.0, -0.2), (6.0, 0.0)],
)
def test_adaptive_kl_controller_update(current_kl, expected_error):
    ctl = AdaptiveKLController(init_coef=0.1, target=6.0, horizon=10_000)
    ctl.update(current_kl, n_steps=256)
    assert ctl.value == pytest.approx(0.1 * (1 + expected_error * 256 / 10_000), abs=1e-12)


def test_adaptive_kl_controller_direction_and_state_roundtrip():
    ctl = AdaptiveKLController(init_coef=0.1, target=6.0, horizon=100)
    ctl.update(12.0, n_steps=10)
    assert ctl.value > 0.1
    high = ctl.value
    ctl.update(1.0, n_steps=10)
    assert ctl.value < high
    restored = AdaptiveKLController(init_coef=1.0, target=1.0, horizon=1)
    restored.load_state_dict(json.loads(json.dumps(ctl.state_dict())))
    assert restored.state_dict() == ctl.state_dict()


# ---------------------------------------------------------------- advantages


def test_token_level_rewards_matches_loop(batch):
    kl, mask = batch
    scores = [1.5, -2.0, 0.25, 3.0]
    kl_coef = 0.1
    expected = []
    for row_kl, row_mask, score in zip(kl.tolist(), mask.tolist(), scores):
        last = max(i for i, m in enumerate(row_mask) if m)
        row = [-kl_coef * k if m else 0.0 for k, m in zip(row_kl, row_mask)]
        row[last] += score
        expected.append(row)
    assert_close(token_level_rewards(t(scores), kl, mask, kl_coef), expected)


def test_token_level_rewards_rejects_empty_row():
    mask = right_padded_mask([2, 0], 3)
    with pytest.raises(ValueError, match="at least one response token"):
        token_level_rewards(t([1.0, 1.0]), torch.zeros(2, 3, dtype=F64), mask, 0.1)


def gae_reference(rewards: list[float], values: list[float], length: int, gamma: float, lam: float):
    advantages = [0.0] * len(rewards)
    next_value, running = 0.0, 0.0
    for i in reversed(range(length)):
        delta = rewards[i] + gamma * next_value - values[i]
        running = delta + gamma * lam * running
        advantages[i] = running
        next_value = values[i]
    returns = [a + v if i < length else 0.0 for i, (a, v) in enumerate(zip(advantages, values))]
    return advantages, returns


@pytest.mark.parametrize("gamma, lam", [(1.0, 1.0), (0.99, 0.95), (0.9, 0.0)])
def test_gae_matches_reversed_scalar_loop(gamma, lam):
    lengths, seq_len = [7, 1, 4, 6, 2], 7
    gen = torch.Generator().manual_seed(1)
    rewards = torch.randn(len(lengths), seq_len, generator=gen, dtype=F64)
    values = torch.randn(len(lengths), seq_len, generator=gen, dtype=F64)
    mask = right_padded_mask(lengths, seq_len)
    adv, ret = gae_advantages(rewards, values, mask, gamma, lam)
    for b, n in enumerate(lengths):
        exp_adv, exp_ret = gae_reference(rewards[b].tolist(), values[b].tolist(), n, gamma, lam)
        assert_close(adv[b], exp_adv)
        assert_close(ret[b], exp_ret)


def test_gae_ignores_padding_values():
    rewards, values = t([[0.0, 1.0, 0.0]]), t([[0.5, 0.2, 0.0]])
    mask = right_padded_mask([2], 3)
    poisoned = values.clone()
    poisoned[0, 2] = 1e3
    for a, b in zip(gae_advantages(rewards, values, mask, 0.9, 0.8),
                    gae_advantages(rewards, poisoned, mask, 0.9, 0.8)):
        assert_close(a, b)


def test_grpo_matches_per_group_loop():
    scores = [1.0, 0.0, 0.0, 1.0, 0.3, -2.0, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]
    n, eps = 4, 1e-6
    expected, expected_unnorm = [], []
    for g in range(0, len(scores), n):
        group = scores[g:g + n]
        mean, std = statistics.fmean(group), statistics.stdev(group)
        expected += [(s - mean) / (std + eps) for s in group]
        expected_unnorm += [s - mean for s in group]
    assert_close(grpo_advantages(t(scores), n, eps=eps), expected)
    assert_close(grpo_advantages(t(scores), n, normalize_std=False), expected_unnorm)
    assert_close(grpo_advantages(t(scores), n)[8:], [0.0] * 4)


def test_grpo_group_of_one_is_zero():
    assert_close(grpo_advantages(t([3.0, -1.0]), group_size=1), [0.0, 0.0])


def test_grpo_rejects_indivisible_batch():
    with pytest.raises(ValueError, match="groups of 4"):
        grpo_advantages(t([1.0, 2.0, 3.0]), group_size=4)


def test_rloo_matches_leave_one_out_loop():
    scores, n = [1.0, 0.0, 2.0, 4.0, -1.0, 3.0], 3
    expected = []
    for g in range(0, len(scores), n):
        group = scores[g:g + n]
        for i, s in enumerate(group):
            others = group[:i] + group[i + 1:]
            expected.append(s - sum(others) / len(others))
    assert_close(rloo_advantages(t(scores), n), expected)


def test_grpo_and_rloo_leave_masked_rows_out_of_the_baseline():
    """Rows whose reward failed get 0 and are not part of their group's mean, std or leave-one-out mean."""
    scores = [1.0, 0.0, 2.0, 5.0, 4.0, -1.0, 3.0, 0.0, 7.0, 7.0, 2.0, 9.0]
    valid = [True, False, True, True, True, True, True, False, False, False, True, False]
    n, eps = 4, 1e-6
    grpo, rloo = [], []
    for g in range(0, len(scores), n):
        kept = [s for s, ok in zip(scores[g:g + n], valid[g:g + n]) if ok]
        for s, ok in zip(scores[g:g + n], valid[g:g + n]):
            if not ok or len(kept) < 2:
                grpo.append(0.0)
                rloo.append(0.0)
                continue
            mean = sum(kept) / len(kept)
            std = (sum((x - mean) ** 2 for x in kept) / (len(kept) - 1)) ** 0.5
            grpo.append((s - mean) / (std + eps))
            others = list(kept)
            others.remove(s)
            rloo.append(s - sum(others) / len(others))
    mask = torch.tensor(valid)
    assert_close(grpo_advantages(t(scores), n, eps=eps, valid=mask), grpo)
    assert_close(rloo_advantages(t(scores), n, valid=mask), rloo)
    everyone = torch.ones(len(scores), dtype=torch.bool)  # all valid: the unmasked functions
    assert_close(grpo_advantages(t(scores), n, valid=everyone), grpo_advantages(t(scores), n).tolist())
    assert_close(rloo_advantages(t(scores), n, valid=everyone), rloo_advantages(t(scores), n).tolist())


def test_rloo_rejects_group_of_one():
    with pytest.raises(ValueError, match="group_size >= 2"):
        rloo_advantages(t([1.0, 2.0]), group_size=1)


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_reinforce_pp_matches_loop(gamma):
    lengths, seq_len = [5, 2, 4], 5
    gen = torch.Generator().manual_seed(2)
    rewards = torch.randn(len(lengths), seq_len, generator=gen, dtype=F64)
    mask = right_padded_mask(lengths, seq_len)
    returns = []
    for row, n in zip(rewards.tolist(), lengths):
        running, out = 0.0, [0.0] * seq_len
        for i in reversed(range(n)):
            running = row[i] + gamma * running
            out[i] = running
        returns.append(out)
    flat = [r for row, n in zip(returns, lengths) for r in row[:n]]
    mean, std = statistics.fmean(flat), statistics.stdev(flat)
    expected = [[(r - mean) / std if i < n else 0.0 for i, r in enumerate(row)]
                for row, n in zip(returns, lengths)]
    torch.testing.assert_close(reinforce_pp_advantages(rewards, mask, gamma), t(expected),
                               atol=1e-6, rtol=1e-6)


def test_broadcast_sequence_advantage():
    mask = right_padded_mask([3, 1], 3)
    expected = [[2.0, 2.0, 2.0], [-1.0, 0.0, 0.0]]
    assert_close(broadcast_sequence_advantage(t([2.0, -1.0]), mask), expected)


# ---------------------------------------------------------------- losses


def test_aggregate_modes_match_loops(batch):
    loss, mask = batch
    rows = [kept(loss[i], mask[i]) for i in range(loss.shape[0])]
    flat = [v for row in rows for v in row]
    assert_close(aggregate(loss, mask, "token_mean"), sum(flat) / len(flat))
    seq_mean_token_mean = statistics.fmean(statistics.fmean(r) for r in rows)
    seq_mean_token_sum = statistics.fmean(sum(r) for r in rows)
    assert_close(aggregate(loss, mask, "seq_mean_token_mean"), seq_mean_token_mean)
    assert_close(aggregate(loss, mask, "seq_mean_token_sum"), seq_mean_token_sum)
    with pytest.raises(ValueError, match="mode"):
        aggregate(loss, mask, "sum")


# (ratio, advantage, expected per-token loss, clipped term active)
PPO_CASES = [
    (1.1, 1.0, -1.1, False),  # inside the range
    (1.1, -1.0, 1.1, False),
    (1.2, 1.0, -1.2, False),  # exactly at the upper edge
    (0.8, -2.0, 1.6, False),  # exactly at the lower edge
    (1.5, 1.0, -1.2, True),  # above the range, positive advantage: clipped
    (1.5, -1.0, 1.5, False),  # above the range, negative advantage: unclipped is worse
    (0.5, 1.0, -0.5, False),  # below the range, positive advantage: unclipped is worse
    (0.5, -1.0, 0.8, True),  # below the range, negative advantage: clipped
]


@pytest.mark.parametrize("ratio, adv, expected, is_clipped", PPO_CASES)
def test_policy_loss_hand_computed(ratio, adv, expected, is_clipped):
    logp = t([[math.log(ratio)]]).requires_grad_()
    loss, metrics = policy_loss(logp, t([[0.0]]), t([[adv]]), t([[1.0]]))
    assert loss.item() == pytest.approx(expected, abs=TOL)
    assert metrics["clipfrac"] == float(is_clipped)
    loss.backward()
    # d(-A r)/d logp = -A r when unclipped; the clipped branch has no gradient.
    expected_grad = 0.0 if is_clipped else -adv * ratio
    assert logp.grad.item() == pytest.approx(expected_grad, abs=TOL)


@pytest.mark.parametrize(
    "ratio, adv, expected",
    [(5.0, -1.0, 3.0), (2.0, -1.0, 2.0), (5.0, 1.0, -1.2), (10.0, -0.5, 1.5)],
)
def test_policy_loss_dual_clip(ratio, adv, expected):
    loss, _ = policy_loss(t([[math.log(ratio)]]), t([[0.0]]), t([[adv]]), t([[1.0]]), dual_clip=3.0)
    assert loss.item() == pytest.approx(expected, abs=TOL)


def test_policy_loss_asymmetric_clip_and_invalid_dual_clip():
    args = (t([[math.log(1.5)]]), t([[0.0]]), t([[1.0]]), t([[1.0]]))
    loss, _ = policy_loss(*args, clip_low=0.2, clip_high=0.28)
    assert loss.item() == pytest.approx(-1.28, abs=TOL)
    with pytest.raises(ValueError, match="dual_clip"):
        policy_loss(*args, dual_clip=1.0)


def test_policy_loss_metrics_and_is_weight():
    ratios = [[1.1, 0.9, 1.5], [1.0, 100.0, 1.0]]
    mask = t([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    logp = t([[math.log(r) for r in row] for row in ratios]).requires_grad_()
    old_logp = torch.zeros_like(logp)
    adv = t([[1.0, -1.0, 1.0], [2.0, 2.0, 2.0]])
    weight = t([[0.5, 1.0, 2.0], [1.0, 1.0, 1.0]]).requires_grad_()
    loss, metrics = policy_loss(logp, old_logp, adv, mask, is_weight=weight)

    per_token = [-0.5 * 1.1, 1.0 * 0.9, -2.0 * 1.2, -2.0 * 1.0]
    assert loss.item() == pytest.approx(sum(per_token) / 4, abs=TOL)
    inside = [1.1, 0.9, 1.5, 1.0]
    assert metrics["ratio_mean"] == pytest.approx(statistics.fmean(inside), abs=TOL)
    assert metrics["ratio_max"] == pytest.approx(1.5, abs=TOL)
    assert metrics["clipfrac"] == pytest.approx(0.25, abs=TOL)
    k3_old_vs_new = statistics.fmean(r - 1 - math.log(r) for r in inside)
    assert metrics["approx_kl"] == pytest.approx(k3_old_vs_new, abs=TOL)
    loss.backward()
    assert weight.grad is None


def test_truncated_importance_weight_matches_loop():
    learner = [[-0.1, -2.0, -0.5], [-1.0, -3.0, 0.0]]
    rollout = [[-0.2, -0.5, -3.0], [-1.0, -3.5, -9.0]]
    mask = right_padded_mask([3, 2], 3)
    cap = 2.0
    expected = [[min(math.exp(a - b), cap) * m for a, b, m in zip(ra, rb, rm)]
                for ra, rb, rm in zip(learner, rollout, mask.tolist())]
    weight = truncated_importance_weight(t(learner).requires_grad_(), t(rollout), mask, cap)
    assert_close(weight, expected)
    assert not weight.requires_grad


# (value, old value, return, clip, expected loss, clipped term larger)
VALUE_CASES = [
    (1.5, 1.0, 2.0, 0.2, 0.5 * 0.8**2, True),
    (1.1, 1.0, 2.0, 0.2, 0.5 * 0.9**2, False),
    (1.5, 1.0, 1.4, 0.2, 0.5 * 0.2**2, True),
    (0.5, 1.0, 0.0, 0.2, 0.5 * 0.8**2, True),
    (0.5, 1.0, 2.0, 0.2, 0.5 * 1.5**2, False),
    (1.5, 1.0, 2.0, None, 0.5 * 0.5**2, False),
]


@pytest.mark.parametrize("v, old, ret, clip, expected, is_clipped", VALUE_CASES)
def test_value_loss_hand_computed(v, old, ret, clip, expected, is_clipped):
    loss, metrics = value_loss(t([[v]]), t([[old]]), t([[ret]]), t([[1.0]]), clip=clip)
    assert loss.item() == pytest.approx(expected, abs=TOL)
    assert metrics["clipfrac"] == float(is_clipped)


def test_entropy_matches_loop():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, 7, generator=gen, dtype=F64) * 3
    expected = []
    for row in logits.tolist():
        out = []
        for z in row:
            total = sum(math.exp(v) for v in z)
            out.append(-sum(math.exp(v) / total * math.log(math.exp(v) / total) for v in z))
        expected.append(out)
    assert_close(entropy_from_logits(logits), expected)


def test_entropy_and_logprobs_stable_for_large_logits():
    logits = t([[[1000.0, 1000.0, -1000.0]]])
    assert_close(entropy_from_logits(logits), [[math.log(2.0)]])
    assert_close(logprobs_from_logits(logits, torch.tensor([[0]])), [[-math.log(2.0)]])


def test_logprobs_from_logits_matches_log_softmax_gather():
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 5, 11, generator=gen, dtype=F64)
    tokens = torch.randint(0, 11, (3, 5), generator=gen)
    expected = torch.log_softmax(logits, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    assert_close(logprobs_from_logits(logits, tokens), expected)


def test_sft_loss_matches_loop(batch):
    logp, mask = batch
    values = kept(logp, mask)
    assert_close(sft_loss(logp, mask), -sum(values) / len(values))


@pytest.mark.parametrize("margin", [None, [0.5, 0.0, 1.0]])
def test_pairwise_rm_loss_matches_loop(margin):
    chosen, rejected = [2.0, -1.0, 0.3], [1.0, 0.5, 0.3]
    margins = margin or [0.0] * len(chosen)
    gaps = [c - r - m for c, r, m in zip(chosen, rejected, margins)]
    expected = statistics.fmean(-math.log(1.0 / (1.0 + math.exp(-d))) for d in gaps)
    loss, metrics = pairwise_rm_loss(t(chosen), t(rejected), None if margin is None else t(margin))
    assert loss.item() == pytest.approx(expected, abs=TOL)
    assert metrics["accuracy"] == pytest.approx(1 / 3)
    mean_gap = statistics.fmean(c - r for c, r in zip(chosen, rejected))
    assert metrics["margin_mean"] == pytest.approx(mean_gap)


# ---------------------------------------------------------------- guards and validation


def test_nonfinite_detection():
    ok, bad = t([1.0, 2.0]), t([float("nan"), float("inf"), float("-inf"), 0.0])
    assert all_finite(ok, ok)
    assert not all_finite(ok, bad)
    assert first_nonfinite({"loss": ok, "grad": ok}) is None
    message = first_nonfinite({"loss": ok, "grad_norm": bad})
    assert "grad_norm" in message and "1 NaN" in message and "2 inf" in message


B_T = torch.zeros(2, 3, dtype=F64)
B_T1 = torch.zeros(2, 4, dtype=F64)


@pytest.mark.parametrize(
    "call, names",
    [
        (lambda: masked_mean(B_T, B_T1), ("x", "mask")),
        (lambda: kl_estimate(B_T, B_T1, "k1"), ("logp", "ref_logp")),
        (lambda: gae_advantages(B_T, B_T1, B_T, 1.0, 1.0), ("rewards", "values")),
        (lambda: token_level_rewards(torch.zeros(3), B_T, B_T + 1, 0.1), ("scores", "mask")),
        (lambda: policy_loss(B_T, B_T, B_T, B_T1), ("logp", "mask")),
        (lambda: policy_loss(B_T, B_T, B_T, B_T, is_weight=B_T1), ("is_weight", "mask")),
        (lambda: value_loss(B_T, B_T, B_T1, B_T, clip=0.2), ("values", "returns")),
        (lambda: logprobs_from_logits(torch.zeros(2, 3, 5), torch.zeros(2, 4, dtype=torch.long)),
         ("logits", "tokens")),
        (lambda: pairwise_rm_loss(torch.zeros(2), torch.zeros(3)), ("chosen", "rejected")),
    ],
)
def test_shape_mismatch_names_both_arguments(call, names):
    with pytest.raises(ValueError) as excinfo:
        call()
    message = str(excinfo.value)
    assert all(name in message for name in names), message
