"""make_experience composes KL, rewards and advantages as each algorithm defines them."""

import torch

from rlhf_ray.config import AlgorithmConfig, KLConfig
from rlhf_ray.experience import make_experience
from rlhf_ray.protocol import EXPERIENCE_REQUIRED, PER_TOKEN_FIELDS, missing_experience_fields


def _batch(n=4, r=5):
    lengths = [5, 3, 1, 4][:n]
    mask = torch.zeros(n, r)
    for i, l in enumerate(lengths):
        mask[i, :l] = 1
    return {"response_mask": mask}


def test_grpo_with_kl_in_loss_uses_raw_group_scores():
    g = torch.Generator().manual_seed(0)
    batch = _batch()
    logp, ref = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    scores = torch.tensor([1.0, 0.0, 3.0, 3.0])
    algo = AlgorithmConfig(name="grpo", kl=KLConfig(placement="loss", estimator="k3"))
    exp, metrics = make_experience(batch, scores, logp, ref, None, algo, kl_coef=0.1, group_size=2)
    # group 0: scores (1, 0): mean .5, std .7071 -> (+.7071, -.7071); group 1 equal -> 0
    want = [0.5 / (0.5**0.5 + 1e-6), -0.5 / (0.5**0.5 + 1e-6), 0.0, 0.0]
    for i in range(4):
        row = exp["advantages"][i]
        m = batch["response_mask"][i].bool()
        assert torch.allclose(row[m], torch.full_like(row[m], want[i]), atol=1e-5)
        assert torch.all(row[~m] == 0)
    assert abs(float(exp["kl_coef"]) - 0.1) < 1e-7
    # kl/mean is the per-sequence sum of k3 under the mask, averaged over rows
    lr = logp - ref
    k3 = (torch.exp(-lr) - 1 + lr) * batch["response_mask"]
    assert abs(metrics["kl/mean"] - float(k3.sum(-1).mean())) < 1e-5


def test_ppo_with_kl_in_reward_matches_hand_loop():
    batch = _batch(n=1, r=3)
    batch["response_mask"][0] = torch.tensor([1.0, 1.0, 0.0])
    logp = torch.tensor([[-1.0, -2.0, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, 0.0]])
    values = torch.tensor([[0.5, 0.25, 9.0]])
    algo = AlgorithmConfig(name="ppo", gamma=1.0, lam=1.0, whiten_advantages=False, kl=KLConfig(estimator="k1"))
    exp, _ = make_experience(batch, torch.tensor([2.0]), logp, ref, values, algo, kl_coef=0.1, group_size=1)
    # rewards: t0 = -0.1*0.5 = -0.05; t1 = -0.1*(-1.0) + 2 = 2.1. gamma=lam=1: A_t = sum r_{>=t} - V_t
    assert torch.allclose(exp["advantages"][0], torch.tensor([2.05 - 0.5, 2.1 - 0.25, 0.0]), atol=1e-6)
    assert torch.allclose(exp["returns"][0], torch.tensor([2.05, 2.1, 0.0]), atol=1e-6)
    assert float(exp["kl_coef"]) == 0.0


def test_rows_with_a_failed_reward_get_no_advantage_and_stay_out_of_the_baselines():
    batch = _batch(n=4, r=5)
    logp = torch.zeros(4, 5)
    scores = torch.tensor([1.0, 0.0, 4.0, 2.0])
    valid = torch.tensor([True, True, True, False])
    grpo = AlgorithmConfig(name="grpo", grpo_normalize_std=False, kl=KLConfig(placement="loss"))
    exp, metrics = make_experience(batch, scores, logp, logp, None, grpo, 0.0, group_size=4, valid=valid)
    # the group mean is over the three valid rows: (1 + 0 + 4) / 3; the failed row gets 0
    want = [1.0 - 5 / 3, 0.0 - 5 / 3, 4.0 - 5 / 3, 0.0]
    for i in range(4):
        m = batch["response_mask"][i].bool()
        assert torch.allclose(exp["advantages"][i][m], torch.full((int(m.sum()),), want[i]), atol=1e-6)
    ppo = AlgorithmConfig(name="ppo", gamma=1.0, lam=1.0, whiten_advantages=True, kl=KLConfig(estimator="k1"))
    values = torch.full((4, 5), 0.5)
    exp, _ = make_experience(batch, scores, logp, logp, values, ppo, 0.0, group_size=1, valid=valid)
    assert torch.all(exp["advantages"][3] == 0) and torch.equal(exp["returns"][3], values[3])
    m = batch["response_mask"] * valid.unsqueeze(-1)
    kept = exp["advantages"][m.bool()]  # whitened over the valid rows' tokens only
    assert abs(float(kept.mean())) < 1e-5 and abs(float(kept.std()) - 1.0) < 1e-4  # masked_whiten: unbiased variance


def test_without_old_logprobs_the_kl_is_measured_from_the_rollout_logprobs():
    """One on-policy step (old_logprobs None): the experience says so, and its KL to the reference uses vLLM's
    log-probs; hand-computed k1 = rollout - ref summed over the response tokens."""
    batch = _batch(n=1, r=3)
    batch["response_mask"][0] = torch.tensor([1.0, 1.0, 0.0])
    batch["rollout_logprobs"] = torch.tensor([[-1.0, -2.0, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, 0.0]])
    algo = AlgorithmConfig(name="reinforce_pp", kl=KLConfig(estimator="k1", placement="loss"))
    exp, metrics = make_experience(batch, torch.tensor([1.0]), None, ref, None, algo, kl_coef=0.2, group_size=1)
    assert exp["old_logprobs"] is None and exp["rollout_logprobs"] is batch["rollout_logprobs"]
    assert abs(metrics["kl/mean"] - ((-1.0 + 1.5) + (-2.0 + 1.0))) < 1e-6
    assert abs(float(exp["kl_coef"]) - 0.2) < 1e-7  # placement "loss": the loss carries the controller's value
    layout = ["input_ids", "attention_mask", "position_ids", "prompt_len"]  # what this test's batch leaves out
    assert missing_experience_fields(exp) == layout
    assert missing_experience_fields({k: v for k, v in exp.items() if k != "kl_coef"}) == layout + ["kl_coef"]


def test_per_token_fields_come_from_the_one_experience_definition():
    assert PER_TOKEN_FIELDS == (
        "response_mask", "rollout_logprobs", "old_logprobs", "ref_logprobs", "advantages", "returns", "old_values"
    )
    assert "returns" not in EXPERIENCE_REQUIRED and "old_logprobs" in EXPERIENCE_REQUIRED
