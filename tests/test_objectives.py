"""The GRPO-family objectives, bounded losses and edge cases, each against a plain-Python reference."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_ray.algorithms import (
    aggregate,
    gae_advantages,
    group_baseline_scores,
    grpo_advantages,
    gspo_policy_loss,
    informative_groups,
    kl_estimate,
    masked_whiten,
    overlong_penalty,
    policy_loss,
    reinforce_pp_advantages,
    value_loss,
)
from rlhf_ray.config import AlgorithmConfig, ConfigError, load_config
from rlhf_ray.experience import make_experience

F64 = torch.float64


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=F64)


# ----------------------------------------------------------------------------- aggregation


def test_seq_mean_token_sum_norm_is_sum_over_batch_times_constant_length():
    loss = _rand(3, 4)
    total = sum(float(loss[b, t]) for b in range(3) for t in range(4) if MASK[b, t])
    assert float(aggregate(loss, MASK, "seq_mean_token_sum_norm")) == pytest.approx(total / (3 * 4))
    assert float(aggregate(loss, MASK, "seq_mean_token_sum_norm", norm_len=10)) == pytest.approx(total / 30)
    with pytest.raises(ValueError, match="norm_len"):
        aggregate(loss, MASK, "seq_mean_token_sum_norm", norm_len=0)


def test_token_sum_is_the_plain_sum_of_per_token_losses():
    loss, values, old_values, returns = _rand(3, 4, seed=20), _rand(3, 4, seed=21), _rand(3, 4, seed=22), _rand(3, 4, seed=23)
    cells = [(b, t) for b in range(3) for t in range(4) if MASK[b, t]]
    assert float(aggregate(loss, MASK, "token_sum")) == pytest.approx(sum(float(loss[b, t]) for b, t in cells))
    logp, old, adv = _rand(3, 4, seed=24), _rand(3, 4, seed=25), _rand(3, 4, seed=26)
    got, _ = policy_loss(logp, old, adv, MASK, 0.2, 0.28, 3.0, agg="token_sum")
    tokens = float(MASK.sum())  # _loop_ppo is a token mean
    want = _loop_ppo(logp.tolist(), old.tolist(), adv.tolist(), MASK.tolist(), 0.2, 0.28, 3.0, 20.0) * tokens
    assert float(got) == pytest.approx(want, rel=1e-9)
    got_v, _ = value_loss(values, old_values, returns, MASK, clip=0.2, agg="token_sum")
    want_v = 0.0
    for b, t in cells:
        v, o, r = float(values[b, t]), float(old_values[b, t]), float(returns[b, t])
        want_v += 0.5 * max((v - r) ** 2, (o + min(max(v - o, -0.2), 0.2) - r) ** 2)
    assert float(got_v) == pytest.approx(want_v, rel=1e-9)


def test_token_sum_is_refused_for_gspo_and_accepted_elsewhere():
    assert AlgorithmConfig(name="dr_grpo", loss_agg="token_sum").loss_agg == "token_sum"
    with pytest.raises(ValueError, match=r"algorithm.loss_agg=token_sum with algorithm.name=gspo.*fix"):
        AlgorithmConfig(name="gspo", loss_agg="token_sum")
    with pytest.raises(ConfigError, match=r"algorithm.loss_agg=token_sum with algorithm.name=gspo"):
        load_config(None, ["rollout.sampling.n=2", "algorithm.name=gspo", "algorithm.loss_agg=token_sum"])


# ----------------------------------------------------------------------------- bounded losses


def _loop_ppo(logp, old, adv, mask, lo, hi, dual, clamp):
    """Plain-loop PPO loss, token mean, with the log-ratio clamp and dual clip."""
    total, count = 0.0, 0
    for b in range(len(logp)):
        for t in range(len(logp[b])):
            if not mask[b][t]:
                continue
            lr = max(-clamp, min(clamp, logp[b][t] - old[b][t]))
            r = math.exp(lr)
            a = adv[b][t]
            term = max(-a * r, -a * min(max(r, 1 - lo), 1 + hi))
            if dual is not None and a < 0:
                term = min(term, -dual * a)
            total += term
            count += 1
    return total / count


def test_policy_loss_clamps_the_log_ratio_and_dual_clips():
    logp, old, adv = _rand(3, 4, seed=1) * 15, _rand(3, 4, seed=2), _rand(3, 4, seed=3)
    logp[0, 0] = 30.0  # log-ratio beyond the clamp
    adv[0, 0] = -1.0
    for dual in (None, 3.0):
        got, stats = policy_loss(logp, old, adv, MASK, 0.2, 0.28, dual, log_ratio_clamp=20.0)
        want = _loop_ppo(logp.tolist(), old.tolist(), adv.tolist(), MASK.tolist(), 0.2, 0.28, dual, 20.0)
        assert float(got) == pytest.approx(want, rel=1e-9)
    # unclamped and without dual clip the same token costs exp(28) ~ 1.4e12: the clamp bounds it by e^20
    assert float(policy_loss(logp, old, adv, MASK, log_ratio_clamp=None)[0]) > 1e10
    assert float(policy_loss(logp, old, adv, MASK, dual_clip=3.0)[0]) < 100
    k1 = sum(-(float(logp[b, t]) - float(old[b, t])) if abs(float(logp[b, t] - old[b, t])) < 20 else -20.0
             for b in range(3) for t in range(4) if MASK[b, t]) / float(MASK.sum())
    assert stats["ppo_kl"] == pytest.approx(k1)


def test_k3_is_clamped_and_its_gradient_stays_finite():
    logp = torch.tensor([[-100.0, -0.5, 0.0]], requires_grad=True)
    ref = torch.tensor([[0.0, -0.4, 0.0]])
    kl = kl_estimate(logp, ref, "k3", log_ratio_clamp=20.0, value_clamp=10.0)
    x = -0.5 + 0.4
    assert kl.tolist()[0] == pytest.approx([10.0, math.exp(-x) - 1 + x, 0.0], rel=1e-5)
    kl.sum().backward()
    assert torch.isfinite(logp.grad).all()
    assert logp.grad[0, 0] == 0.0  # clamped: no gradient
    assert float(logp.grad[0, 1]) == pytest.approx(1 - math.exp(-x), rel=1e-5)
    unbounded = torch.tensor([[-100.0]], requires_grad=True)
    kl_estimate(unbounded, torch.zeros(1, 1), "k3").sum().backward()
    assert not torch.isfinite(unbounded.grad).all()  # what the clamps prevent


def test_masked_positions_do_not_influence_loss_or_gradients():
    """Extreme values where mask is 0: the same finite loss and gradients as the run without those positions."""
    logp0, old0, adv0 = _rand(3, 4, seed=4), _rand(3, 4, seed=5), _rand(3, 4, seed=6)
    keep = MASK.bool()
    extreme_logp = torch.where(keep, logp0, torch.tensor(80.0, dtype=F64))
    extreme_old = torch.where(keep, old0, torch.tensor(-1e4, dtype=F64))
    extreme_adv = torch.where(keep, adv0, torch.tensor(float("inf"), dtype=F64))
    weight = torch.where(keep, torch.ones_like(logp0), torch.tensor(float("nan"), dtype=F64))

    def run(lp, old, adv, w, fn):
        lp = lp.clone().requires_grad_(True)
        loss = fn(lp, old, adv, w)
        loss.backward()
        return float(loss.detach()), lp.grad

    for fn in (
        lambda lp, old, adv, w: policy_loss(lp, old, adv, MASK, dual_clip=3.0, is_weight=w)[0],
        lambda lp, old, adv, w: gspo_policy_loss(lp, old, adv, MASK, is_weight=w)[0],
    ):
        loss_x, grad_x = run(extreme_logp, extreme_old, extreme_adv, weight, fn)
        loss_c, grad_c = run(logp0, old0, adv0, torch.ones_like(logp0), fn)
        assert math.isfinite(loss_x) and torch.isfinite(grad_x).all()
        assert loss_x == pytest.approx(loss_c, rel=1e-12)
        assert torch.allclose(grad_x, grad_c * MASK) and (grad_x[~keep] == 0).all()


# ----------------------------------------------------------------------------- GSPO


def test_gspo_uses_the_geometric_mean_ratio_with_sequence_clipping():
    logp, old = _rand(3, 4, seed=7) * 0.01, _rand(3, 4, seed=8) * 0.01
    seq_adv = [1.0, -2.0, 0.5]
    adv = torch.tensor(seq_adv, dtype=F64)[:, None].expand(3, 4) * MASK
    lo, hi = 3e-4, 4e-4
    losses = []
    for b in range(3):
        toks = [t for t in range(4) if MASK[b, t]]
        s = math.exp(sum(float(logp[b, t] - old[b, t]) for t in toks) / len(toks))  # geometric mean of ratios
        a = seq_adv[b]
        losses.append(max(-a * s, -a * min(max(s, 1 - lo), 1 + hi)))
    got, stats = gspo_policy_loss(logp, old, adv, MASK, lo, hi)
    assert float(got) == pytest.approx(sum(losses) / 3, rel=1e-9)
    assert 0 <= stats["clipfrac"] <= 1


# ----------------------------------------------------------------------------- advantages


def test_dr_grpo_advantages_have_no_std_and_grpo_std_eps_is_used():
    scores = torch.tensor([1.0, 2.0, 4.0, 0.0, 0.0, 3.0], dtype=F64)
    groups = [[1.0, 2.0, 4.0], [0.0, 0.0, 3.0]]
    plain = [x - sum(g) / 3 for g in groups for x in g]
    assert grpo_advantages(scores, 3, normalize_std=False).tolist() == pytest.approx(plain)
    eps = 0.5
    want = []
    for g in groups:
        mean = sum(g) / 3
        std = math.sqrt(sum((x - mean) ** 2 for x in g) / 2)
        want += [(x - mean) / (std + eps) for x in g]
    assert grpo_advantages(scores, 3, True, eps).tolist() == pytest.approx(want)


def test_reinforce_pp_baseline_centres_by_group_then_whitens():
    scores = torch.tensor([1.0, 3.0, 0.0, 4.0], dtype=F64)
    valid = torch.tensor([True, True, True, False])
    assert group_baseline_scores(scores, 2, valid).tolist() == pytest.approx([-1.0, 1.0, 0.0, 0.0])


def test_overlong_penalty_is_linear_over_the_buffer():
    lengths = torch.tensor([5, 12, 14, 16, 20])
    got = overlong_penalty(lengths, max_len=16, buffer=4, penalty=2.0).tolist()
    want = [0.0 if n <= 12 else -2.0 * min(n - 12, 4) / 4 for n in lengths.tolist()]
    assert got == pytest.approx(want)
    with pytest.raises(ValueError, match="buffer"):
        overlong_penalty(lengths, max_len=16, buffer=0)


def test_informative_groups_drops_groups_with_equal_rewards():
    scores = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 2.0, 2.0, 5.0])
    valid = torch.tensor([True, True, True, True, True, True, True, True, False])
    want = [len({s for s, v in zip(scores[i:i + 3].tolist(), valid[i:i + 3].tolist()) if v}) > 1 for i in (0, 3, 6)]
    assert informative_groups(scores, 3, valid).tolist() == want == [False, True, False]


# ----------------------------------------------------------------------------- edge cases


def test_whitening_with_fewer_than_two_tokens_gives_zero_advantages():
    x = _rand(2, 3)
    one = torch.tensor([[0, 1, 0], [0, 0, 0]], dtype=F64)
    assert masked_whiten(x, one).abs().sum() == 0
    assert masked_whiten(x, torch.zeros_like(x)).abs().sum() == 0
    assert reinforce_pp_advantages(x, torch.tensor([[1, 0, 0], [0, 0, 0]], dtype=F64)).abs().sum() == 0


def test_gae_rejects_interior_mask_gaps():
    mask = torch.tensor([[1, 0, 1, 0], [1, 1, 0, 0]], dtype=F64)
    with pytest.raises(ValueError, match=r"rows \[0\].*right padding"):
        gae_advantages(_rand(2, 4), _rand(2, 4), mask, 1.0, 0.95)
    with pytest.raises(ValueError, match="right padding"):
        reinforce_pp_advantages(_rand(2, 4), mask)


def _batch(mask: torch.Tensor) -> dict[str, torch.Tensor]:
    n, r = mask.shape
    return {"response_mask": mask.float(), "input_ids": torch.zeros(n, r + 2, dtype=torch.long), "prompt_len": torch.tensor(2)}


@pytest.mark.parametrize("name", ["ppo", "reinforce_pp", "reinforce_pp_baseline", "grpo"])
def test_every_reward_failed_gives_zero_advantages_not_an_error(name: str):
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.float32)
    algo = AlgorithmConfig(name=name, whiten_advantages=True)
    values = torch.zeros(2, 3) if name == "ppo" else None
    exp, _ = make_experience(_batch(mask), torch.zeros(2), torch.zeros(2, 3), torch.zeros(2, 3), values, algo, 0.1, 2,
                             valid=torch.tensor([False, False]))
    assert exp["advantages"].abs().sum() == 0
    assert exp["response_mask"].sum() == 0  # out of the token-mean denominator and the critic's targets


def test_failed_rows_leave_the_token_mean_denominator():
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]], dtype=torch.float32)
    valid = torch.tensor([True, False, True, True])
    algo = AlgorithmConfig(name="grpo")
    scores = torch.tensor([1.0, 5.0, 0.0, 2.0])
    exp, _ = make_experience(_batch(mask), scores, torch.zeros(4, 3), torch.zeros(4, 3), None, algo, 0.0, 2, valid=valid)
    logp = torch.zeros(4, 3, requires_grad=True)
    loss, _ = policy_loss(logp, torch.zeros(4, 3), exp["advantages"], exp["response_mask"])
    counted = sum(int(mask[b].sum()) for b in range(4) if valid[b])
    total = sum(-float(exp["advantages"][b, t]) for b in range(4) for t in range(3) if valid[b] and mask[b, t])
    assert float(loss.detach()) == pytest.approx(total / counted)


def test_overlong_filter_and_penalty_in_experience():
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.float32)
    algo = AlgorithmConfig(name="dapo", overlong_buffer=2, overlong_penalty=1.0, overlong_filter=True)
    truncated = torch.tensor([True, False, False, False])
    exp, metrics = make_experience(_batch(mask), torch.zeros(4), torch.zeros(4, 4), torch.zeros(4, 4), None, algo,
                                   0.0, 2, truncated=truncated, max_new_tokens=4)
    assert exp["response_mask"][0].sum() == 0 and metrics["rollout/overlong_filtered"] == 1
    # penalties 0 / 0 / -0.5 / 0 (lengths 4 filtered, 2, 3, 1 with max 4 and buffer 2): group 2 = (-0.5, 0)
    assert metrics["reward/overlong_penalty_mean"] == pytest.approx((-1.0 + 0 - 0.5 + 0) / 4)
    assert float(exp["advantages"][2, 0]) < 0 < float(exp["advantages"][3, 0])


# ----------------------------------------------------------------------------- config presets


def test_algorithm_presets_follow_the_algorithm_and_yield_to_explicit_settings():
    def algo(*overrides: str):
        return load_config(None, ["rollout.sampling.n=2", *overrides]).algorithm

    assert (algo("algorithm.name=grpo").kl.placement, algo("algorithm.name=grpo").kl.estimator) == ("loss", "k3")
    assert algo().dual_clip == 3.0 and algo().kl.placement == "reward"
    dapo = algo("algorithm.name=dapo")
    assert (dapo.clip_low, dapo.clip_high, dapo.loss_agg, dapo.dynamic_sampling) == (0.2, 0.28, "token_mean", True)
    dr = algo("algorithm.name=dr_grpo")
    assert dr.grpo_normalize_std is False and dr.loss_agg == "seq_mean_token_sum_norm"
    assert algo("algorithm.name=gspo").clip_high == 4e-4
    assert algo("algorithm.name=grpo", "algorithm.kl.estimator=k1").kl.estimator == "k1"
    assert algo("algorithm.name=dapo", "algorithm.clip_high=0.3").clip_high == 0.3
    assert algo().log_ratio_clamp == 20.0 and algo().kl.clamp == 10.0
