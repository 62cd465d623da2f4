"""The DeepSpeed learner group, with real Ray actors and real DeepSpeed on CPU (gloo), on a tiny Qwen2.

One 1-rank group is the reference; 2-rank ZeRO-2 and ZeRO-3 groups must match it. Groups are
module-scoped (each costs a few seconds of actor start-up) and tests run in file order.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

from learners import LearnerGroup
from rlhf_ray.config import AlgorithmConfig, LearnerConfig, ModelConfig
from rlhf_ray.protocol import Sample, collate

N = 8  # rows in the experience: 2 minibatches of 4, each cut into micro-batches of 2
PPO_METRICS = ("train/policy_loss", "train/clipfrac", "train/approx_kl", "train/entropy", "train/kl_loss", "train/lr")
ALGO = AlgorithmConfig(kl={"placement": "loss", "estimator": "k3"}, entropy_coef=0.01, tis_cap=2.0)


def learner_cfg(ranks: int, zero_stage: int, **kw) -> LearnerConfig:
    defaults = dict(micro_batch_size=2, minibatch_size=4, ppo_epochs=2, lr=1e-3, critic_lr=1e-3, warmup_steps=1)
    return LearnerConfig(
        num_ranks=ranks, num_cpus_per_rank=0.5, zero_stage=zero_stage, call_timeout_s=300, **(defaults | kw)
    )


@pytest.fixture(scope="module")
def vocab(tiny_model_dir: Path) -> int:
    return AutoConfig.from_pretrained(tiny_model_dir / "policy").vocab_size


@pytest.fixture(scope="module")
def batch(vocab: int) -> dict[str, torch.Tensor]:
    """Left-padded prompts of 2-6 tokens, right-padded responses of 1-5 tokens (protocol.collate)."""
    g = torch.Generator().manual_seed(0)
    samples = []
    for i in range(N):
        prompt = torch.randint(3, vocab, (int(torch.randint(2, 7, (1,), generator=g)),), generator=g).tolist()
        response = torch.randint(3, vocab, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g).tolist()
        samples.append(Sample(i, 0, prompt, response, [0.0] * len(response), "stop", 0))
    return collate(samples, pad_id=0)


def make_experience(batch: dict[str, torch.Tensor], old_logp: torch.Tensor) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    mask = batch["response_mask"]
    noise = lambda: 0.1 * torch.randn(mask.shape, generator=g) * mask  # noqa: E731
    return dict(
        batch,
        old_logprobs=old_logp,
        advantages=torch.randn(mask.shape, generator=g) * mask,
        ref_logprobs=old_logp + noise(),
        rollout_logprobs=old_logp + noise(),
        kl_coef=torch.tensor(0.1),
    )


def start(
    tiny_model_dir: Path, role: str, ranks: int, stage: int, folder: str = "policy", algo: AlgorithmConfig = ALGO, **kw
) -> LearnerGroup:
    return LearnerGroup(role, str(tiny_model_dir / folder), learner_cfg(ranks, stage, **kw), ModelConfig(), algo)


@pytest.fixture(scope="module")
def single(ray_cluster, tiny_model_dir):
    with start(tiny_model_dir, "policy", 1, 2) as group:
        yield group


@pytest.fixture(scope="module")
def zero2(ray_cluster, tiny_model_dir):
    with start(tiny_model_dir, "policy", 2, 2) as group:
        yield group


@pytest.fixture(scope="module")
def zero3(ray_cluster, tiny_model_dir):
    with start(tiny_model_dir, "policy", 2, 3) as group:
        yield group


def weights(group: LearnerGroup) -> dict[str, torch.Tensor]:
    return dict(group.export_weights())


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).detach().abs().max()) for k in a)


def assert_ranks_identical(group: LearnerGroup) -> None:
    first, *rest = group.param_checksums()
    assert all(r == first for r in rest), "ranks hold different parameters"


# ---------------------------------------------------------------------------- forward passes


def test_compute_logprobs_equals_plain_transformers(zero2, zero3, tiny_model_dir, batch):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir / "policy", dtype=torch.float32).eval()
    P, R = int(batch["prompt_len"]), batch["response_mask"].shape[1]
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"]).logits[:, P - 1 : P + R - 1]
    tokens = batch["input_ids"][:, P : P + R]
    expected = torch.log_softmax(logits / 0.7, -1).gather(-1, tokens[..., None])[..., 0] * batch["response_mask"]
    for group in (zero2, zero3):
        got = group.compute_logprobs(batch, temperature=0.7)
        assert got.shape == (N, R) and got.dtype == torch.float32
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # 7 rows do not split evenly across 2 ranks: padded and trimmed back.
    odd = {k: v[:7] if v.dim() else v for k, v in batch.items()}
    torch.testing.assert_close(zero3.compute_logprobs(odd, 0.7), expected[:7], atol=1e-5, rtol=0)


def test_export_weights_are_the_hf_state_dict(zero3, tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir / "policy", dtype=torch.float32)
    exported = weights(zero3)
    assert max_diff(exported, dict(model.named_parameters())) == 0.0


# ---------------------------------------------------------------------------- PPO across layouts


def test_ppo_update_same_on_1_and_2_ranks_zero2_and_zero3(single, zero2, zero3, batch):
    initial = weights(single)
    exp = make_experience(batch, single.compute_logprobs(batch))
    groups = {"single": single, "zero2": zero2, "zero3": zero3}
    runs = {name: [g.ppo_update(exp), g.ppo_update(exp)] for name, g in groups.items()}
    for metrics in runs["single"]:
        assert metrics["train/skipped_steps"] == 0 and metrics["train/grad_norm"] > 0
        assert set(PPO_METRICS) <= metrics.keys()
    reference = weights(single)
    for name in ("zero2", "zero3"):
        for got, want in zip(runs[name], runs["single"]):
            assert got.keys() == want.keys()
            for k in want:
                assert got[k] == pytest.approx(want[k], rel=1e-4, abs=1e-6), (name, k)
        assert_ranks_identical(groups[name])
        assert max_diff(weights(groups[name]), reference) < 1e-5, name
    assert max_diff(reference, initial) > 1e-4  # the updates did move the weights


# ---------------------------------------------------------------------------- the numerical guard


def one_minibatch(batch: dict[str, torch.Tensor], group: LearnerGroup) -> dict[str, torch.Tensor]:
    """The first 4 rows (one minibatch, so both epochs' steps see every row)."""
    rows = {k: v[:4] if v.dim() else v for k, v in batch.items()}
    return make_experience(rows, group.compute_logprobs(rows))


@pytest.mark.parametrize("layout", ["zero2", "zero3"])
def test_nan_advantages_skip_the_step_and_leave_weights_untouched(layout, request, batch):
    group = request.getfixturevalue(layout)
    exp = one_minibatch(batch, group)
    exp["advantages"][3, 0] = float("nan")
    before = weights(group)
    metrics = group.ppo_update(exp)
    assert metrics["train/skipped_steps"] == 2.0  # both epochs' only step
    assert max_diff(weights(group), before) == 0.0
    assert_ranks_identical(group)


@pytest.mark.parametrize("layout", ["zero2", "zero3"])
def test_nonfinite_gradient_on_one_rank_is_skipped_on_all(layout, request, batch):
    group = request.getfixturevalue(layout)
    exp = one_minibatch(batch, group)
    # A finite experience whose gradient overflows on one token of one row (so on one rank): an advantage
    # near the float32 maximum keeps the loss finite (the ratio is about 1, inside the clip), but the
    # squared gradients of the norm overflow. (A ratio overflow no longer does it: the log-ratio is clamped.)
    exp["advantages"][3, 0] = 3e38
    before = weights(group)
    metrics = group.ppo_update(exp)
    assert metrics["train/skipped_steps"] == 2.0
    assert max_diff(weights(group), before) == 0.0
    assert_ranks_identical(group)
    # The next clean update steps again.
    assert group.ppo_update(one_minibatch(batch, group))["train/skipped_steps"] == 0.0


def test_mismatched_shapes_are_clear_errors(zero2, batch):
    exp = make_experience(batch, torch.zeros(batch["response_mask"].shape))
    exp["advantages"] = exp["advantages"][:, :-1]
    R = batch["response_mask"].shape[1]
    expected = f"advantages has shape ({N}, {R - 1}) but response_mask has shape ({N}, {R})"
    with pytest.raises(ValueError, match=re.escape(expected)):
        zero2.ppo_update(exp)
    with pytest.raises(ValueError, match=r"missing \['advantages'\]"):
        zero2.ppo_update({k: v for k, v in exp.items() if k != "advantages"})
    with pytest.raises(ValueError, match="attention_mask has shape"):
        zero2.compute_logprobs(dict(batch, attention_mask=batch["attention_mask"][:, 1:]))
    with pytest.raises(ValueError, match="needs a reward learner group"):
        zero2.compute_rewards(batch)


# ---------------------------------------------------------------------------- checkpoints


def test_save_load_round_trip_without_pickle(zero2, zero3, batch, tmp_path):
    zero2.save(str(tmp_path / "ckpt"))
    files = {p.name for p in tmp_path.rglob("*") if p.is_file()}
    assert all(f.endswith((".json", ".safetensors", ".txt", ".jinja")) for f in files), files
    model_folder = {p.name for p in (tmp_path / "ckpt").iterdir()}  # only the model and tokenizer: hub-ready
    assert "config.json" in model_folder and "tokenizer.json" in model_folder
    assert not {f for f in model_folder if "optimizer" in f or "rng" in f or "state" in f or (tmp_path / "ckpt" / f).is_dir()}
    saved = weights(zero2)
    optimizer = load_file(tmp_path / "learner_state/ckpt/optimizer-00001.safetensors")
    assert {k.split("/")[0] for k in optimizer} == {"exp_avg", "exp_avg_sq"} and len(optimizer) == 2 * len(saved)
    assert any(float(t.abs().sum()) > 0 for t in optimizer.values())

    exp = make_experience(batch, zero2.compute_logprobs(batch))
    zero2.ppo_update(exp)  # move away from the checkpoint
    zero2.load(str(tmp_path / "ckpt"))
    assert max_diff(weights(zero2), saved) == 0.0
    zero2.save(str(tmp_path / "again"))
    assert max_diff(load_file(tmp_path / "learner_state/again/optimizer-00001.safetensors"), optimizer) == 0.0
    state = json.loads((tmp_path / "learner_state/ckpt/state.json").read_text())
    assert state == json.loads((tmp_path / "learner_state/again/state.json").read_text())

    # The format does not depend on the layout: ZeRO-3 resumes a ZeRO-2 checkpoint, and both then train alike.
    zero3.load(str(tmp_path / "ckpt"))
    assert max_diff(weights(zero3), saved) == 0.0
    m2, m3 = zero2.ppo_update(exp), zero3.ppo_update(exp)
    assert m3["train/policy_loss"] == pytest.approx(m2["train/policy_loss"], rel=1e-4, abs=1e-6)
    assert m3["train/lr"] == m2["train/lr"]
    assert max_diff(weights(zero3), weights(zero2)) < 1e-5


def test_one_step_update_without_old_logprobs_equals_one_with_them(ray_cluster, tiny_model_dir, batch, single):
    """One on-policy optimizer step taking its own log-probs as the old ones (2 ranks, ZeRO-2) == the same step
    given old log-probs from compute_logprobs (1 rank): same weights and stats, TIS weights included; it also
    measures |learner - vLLM| on the sampled tokens."""
    one_step = dict(ppo_epochs=1, minibatch_size=N)
    with start(tiny_model_dir, "policy", 1, 2, **one_step) as given, start(tiny_model_dir, "policy", 2, 2, **one_step) as own:
        old = given.compute_logprobs(batch)
        exp = make_experience(batch, old)
        without_old = dict(exp, old_logprobs=None)
        m_given, m_own = given.ppo_update(exp), own.ppo_update(without_old)
        assert max_diff(weights(own), weights(given)) < 1e-5
    for key in ("train/policy_loss", "train/entropy", "train/kl_loss", "train/clipfrac", "train/grad_norm"):
        assert m_own[key] == pytest.approx(m_given[key], rel=1e-4, abs=1e-6), key
    mask = batch["response_mask"]
    gap = (old - exp["rollout_logprobs"]).abs() * mask
    assert m_own["train/logprob_diff_mean"] == pytest.approx(float(gap.sum() / mask.sum()), abs=1e-6)
    assert m_own["train/logprob_diff_max"] == pytest.approx(float(gap.max()), abs=1e-6)  # a max over both ranks
    assert "train/logprob_diff_mean" not in m_given
    with pytest.raises(ValueError, match="exact only for one optimizer step.*= 4 steps"):
        single.ppo_update(without_old)  # 2 epochs x 2 minibatches


TOKEN_SUM = AlgorithmConfig(name="grpo", loss_agg="token_sum", entropy_coef=0.01, tis_cap=None)


def plain_loop_token_sum(tiny_model_dir: Path, exp: dict[str, torch.Tensor]) -> tuple[float, float]:
    """TOKEN_SUM's loss on `exp` as a loop over rows and response tokens (transformers, fp32):
    sum of clipped surrogate - 0.01 * entropy + kl_coef * k3. Returns (gradient norm, policy-loss sum)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir / "policy", dtype=torch.float32)
    P, R = int(exp["prompt_len"]), exp["response_mask"].shape[1]
    logits = model(input_ids=exp["input_ids"], attention_mask=exp["attention_mask"],
                   position_ids=exp["position_ids"]).logits
    total, pg_sum = torch.zeros(()), 0.0
    for b in range(exp["input_ids"].shape[0]):
        for t in range(R):
            if not exp["response_mask"][b, t]:
                continue
            logp_all = torch.log_softmax(logits[b, P - 1 + t], -1)
            logp = logp_all[exp["input_ids"][b, P + t]]
            ratio = torch.exp(logp - exp["old_logprobs"][b, t])
            a = float(exp["advantages"][b, t])
            pg = torch.maximum(-a * ratio, -a * ratio.clamp(1 - 0.2, 1 + 0.2))
            entropy = -(logp_all.exp() * logp_all).sum()
            x = logp - exp["ref_logprobs"][b, t]
            k3 = torch.exp(-x) - 1 + x
            total = total + pg - 0.01 * entropy + float(exp["kl_coef"]) * k3
            pg_sum += float(pg.detach())
    total.backward()
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]))
    return float(norm), pg_sum


def test_token_sum_gradient_is_the_plain_sum_on_1_and_2_ranks_and_any_micro_batches(ray_cluster, tiny_model_dir, batch):
    """loss_agg=token_sum: one minibatch as 1 micro-batch on 1 rank, and as 2 micro-batches on each of 2 ranks,
    gives the gradient of the plain sum over its tokens (no normaliser: a token mean's would be `tokens` times
    smaller) and the same weights; the stats stay per-token means."""
    rows = {k: v[:4] if v.dim() else v for k, v in batch.items()}
    one_step = dict(ppo_epochs=1, minibatch_size=4)
    with start(tiny_model_dir, "policy", 1, 2, algo=TOKEN_SUM, micro_batch_size=4, **one_step) as whole, \
            start(tiny_model_dir, "policy", 2, 2, algo=TOKEN_SUM, micro_batch_size=1, **one_step) as split:
        exp = make_experience(rows, whole.compute_logprobs(rows))
        m_whole, m_split = whole.ppo_update(exp), split.ppo_update(exp)
        assert max_diff(weights(split), weights(whole)) < 1e-5
    want_norm, pg_sum = plain_loop_token_sum(tiny_model_dir, exp)
    tokens = float(rows["response_mask"].sum())
    for m in (m_whole, m_split):
        assert m["train/skipped_steps"] == 0
        assert m["train/grad_norm"] == pytest.approx(want_norm, rel=1e-4)
        assert m["train/policy_loss"] == pytest.approx(pg_sum / tokens, rel=1e-4, abs=1e-6)


# ---------------------------------------------------------------------------- SFT, reward model, critic


def test_sft_steps_lower_the_loss(single, vocab):
    g = torch.Generator().manual_seed(2)
    input_ids = torch.randint(3, vocab, (4, 12), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2:, 9:] = 0
    loss_mask = attention_mask.clone()
    loss_mask[:, :4] = 0  # a 4-token "prompt" is not predicted
    sft = {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}
    losses = [single.sft_step(sft)["train/sft_loss"] for _ in range(20)]
    assert losses[-1] < 0.75 * losses[0], losses


def test_sft_eval_loss_matches_a_plain_loop(zero2, tiny_model_dir, vocab):
    """Held-out SFT loss on 2 ranks (5 rows, so one rank gets a padding row) == token-by-token NLL in transformers."""
    g = torch.Generator().manual_seed(4)
    input_ids = torch.randint(3, vocab, (5, 10), generator=g)
    lengths, prompts = [10, 7, 9, 4, 10], [3, 2, 5, 1, 6]
    attention_mask = torch.tensor([[int(t < n) for t in range(10)] for n in lengths])
    loss_mask = torch.tensor([[int(p <= t < n) for t in range(10)] for n, p in zip(lengths, prompts)])
    got = zero2.sft_eval_loss({"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask})

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir / "policy", dtype=torch.float32).eval()
    model.load_state_dict(weights(zero2))
    nll, count = 0.0, 0
    with torch.no_grad():
        for row, n, p in zip(input_ids, lengths, prompts):
            for t in range(max(p, 1), n):  # predict token t from tokens [0, t)
                logits = model(input_ids=row[None, :t]).logits[0, -1]
                nll -= float(torch.log_softmax(logits, -1)[row[t]])
                count += 1
    assert got == pytest.approx(nll / count, abs=1e-5)


@pytest.fixture(scope="module")
def reward(ray_cluster, tiny_model_dir):
    with start(tiny_model_dir, "reward", 2, 3, folder="reward") as group:
        yield group


def pairs(vocab: int, n: int = 16) -> dict[str, torch.Tensor]:
    """Chosen responses use the lower half of the vocabulary, rejected ones the upper half; right-padded."""
    g = torch.Generator().manual_seed(3)
    half = vocab // 2
    out = {}
    for side, (lo, hi) in {"chosen": (3, half), "rejected": (half, vocab)}.items():
        ids = torch.randint(lo, hi, (n, 10), generator=g)
        mask = torch.ones_like(ids)
        mask[::3, 7:] = 0
        out[f"{side}_input_ids"], out[f"{side}_attention_mask"] = ids * mask, mask
    return out


def test_compute_rewards_equals_transformers(reward, tiny_model_dir, vocab):
    data = pairs(vocab)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir / "reward", dtype=torch.float32).eval()
    ids, mask = data["chosen_input_ids"], data["chosen_attention_mask"]
    with torch.no_grad():
        hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    expected = model.score(hidden[torch.arange(len(ids)), mask.sum(-1) - 1]).squeeze(-1)
    got = reward.compute_rewards({"input_ids": ids, "attention_mask": mask})
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_rm_steps_learn_the_preference(reward, vocab):
    data = pairs(vocab)
    runs = [reward.rm_step(data) for _ in range(20)]
    assert runs[-1]["train/rm_loss"] < 0.5 * runs[0]["train/rm_loss"]
    assert runs[-1]["train/rm_accuracy"] > 0.9
    assert_ranks_identical(reward)


def test_critic_values_and_value_update(ray_cluster, tiny_model_dir, batch):
    # A critic started from the causal LM folder: the backbone is loaded, the value head is new.
    with start(tiny_model_dir, "critic", 2, 2) as critic:
        runs = []
        for _ in range(4):  # as in PPO, each round clips around the values of its own rollout
            values = critic.compute_values(batch)
            assert values.shape == batch["response_mask"].shape
            assert (values[batch["response_mask"] == 0] == 0).all()
            runs.append(critic.value_update(dict(batch, old_values=values, returns=batch["response_mask"].clone())))
        assert runs[-1]["train/value_loss"] < 0.5 * runs[0]["train/value_loss"], runs
        assert {"train/value_clipfrac", "train/values_mean", "train/grad_norm", "train/lr"} <= runs[0].keys()
        assert_ranks_identical(critic)
