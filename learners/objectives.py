"""Micro-batch losses of each learner update, built from `rlhf_ray.algorithms`.

Every objective returns (loss, stats): the loss is the micro-batch's own aggregate (a mean over
its tokens or its rows) and stats are floats averaged the same way. Each objective has a matching
size function, the number of tokens or rows that mean is over; the update loop rescales by
size / (size of the whole minibatch on all ranks), which turns the sum over micro-batches and
ranks into exactly the minibatch aggregate (see `training.py`). With `loss_agg=token_sum` the loss
is the micro-batch's token sum and is not rescaled (`loss_is_sum`): the sum of the micro-batch sums
is the minibatch's; its stats are still per-token means, weighted by tokens.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from rlhf_ray.algorithms import (
    aggregate,
    entropy_from_logits,
    gspo_policy_loss,
    kl_estimate,
    logprobs_from_logits,
    masked_mean,
    pairwise_rm_loss,
    policy_loss,
    sft_loss,
    truncated_importance_weight,
    value_loss,
)
from rlhf_ray.config import AlgorithmConfig
from rlhf_ray.modeling import response_logits
from rlhf_ray.protocol import TensorBatch as Batch

from .models import sequence_scores, token_values

Result = tuple[torch.Tensor, dict[str, float]]


def response_tokens(batch: Batch) -> torch.Tensor:
    """The sampled response tokens [N, R] (pad ids beyond each response)."""
    P, R = int(batch["prompt_len"]), batch["response_mask"].shape[1]
    return batch["input_ids"][:, P : P + R]


def tokens_or_rows(algo: AlgorithmConfig) -> Callable[[Batch], float]:
    """Size function matching the policy loss: response tokens for token_mean and token_sum, rows otherwise
    (GSPO: rows)."""
    if algo.loss_agg in ("token_mean", "token_sum") and algo.name != "gspo":
        return lambda micro: float(micro["response_mask"].sum())
    return lambda micro: float(micro["response_mask"].shape[0])


def loss_is_sum(algo: AlgorithmConfig) -> bool:
    """True when a micro-batch's loss is a plain token sum (token_sum): the update adds the micro-batch
    losses up unscaled instead of weighting them by size."""
    return algo.loss_agg == "token_sum" and algo.name != "gspo"


def per_token(value: torch.Tensor, mask: torch.Tensor, agg: str) -> float:
    """A loss term as a stat: token_sum terms divided by the micro-batch's response tokens (a per-token
    mean, as the stats of token_mean are); other modes unchanged."""
    value = float(value.detach())
    return value / max(float(mask.sum()), 1.0) if agg == "token_sum" else value


def ppo_objective(model: torch.nn.Module, micro: Batch, algo: AlgorithmConfig, temperature: float) -> Result:
    """Clipped policy loss - entropy_coef * entropy + kl_coef * KL(pi || ref).

    micro: rows of a `protocol.Experience`: response_mask, advantages, ref_logprobs, rollout_logprobs
    (vLLM's, for the truncated importance weight when algo.tis_cap is set) [n, R]; kl_coef (0-d,
    0 when the KL is in the reward: `make_experience` decides); old_logprobs [n, R], or None for a
    single on-policy optimizer step, whose old log-probs are this forward's own, detached (the stats
    then also hold logprob_diff_mean/_max, |learner - vLLM| over the sampled tokens, nats/token and nats).
    """
    mask = micro["response_mask"]
    logits = response_logits(model, micro)
    if temperature != 1.0:
        logits = logits / temperature
    # Masking log-probs keeps padding finite in exp() of the ratio and the KL estimators.
    logp = logprobs_from_logits(logits, response_tokens(micro)) * mask
    own_old = micro["old_logprobs"] is None
    old_logp = logp.detach() if own_old else micro["old_logprobs"]
    is_weight = None
    if algo.tis_cap is not None:
        is_weight = truncated_importance_weight(old_logp, micro["rollout_logprobs"], mask, algo.tis_cap)
    if algo.name == "gspo":
        pg, pg_stats = gspo_policy_loss(
            logp, old_logp, micro["advantages"], mask, algo.clip_low, algo.clip_high, is_weight, algo.log_ratio_clamp
        )
        agg = "seq_mean_token_mean"  # GSPO's loss is a mean over sequences; its entropy and KL terms follow
    else:
        pg, pg_stats = policy_loss(
            logp, old_logp, micro["advantages"], mask, algo.clip_low, algo.clip_high, algo.dual_clip, is_weight,
            algo.loss_agg, algo.log_ratio_clamp, algo.loss_norm_len,
        )
        agg = algo.loss_agg
    with torch.set_grad_enabled(algo.entropy_coef > 0 and torch.is_grad_enabled()):
        entropy = aggregate(entropy_from_logits(logits), mask, agg, algo.loss_norm_len)
    loss = pg - algo.entropy_coef * entropy
    per_token_kl = kl_estimate(logp, micro["ref_logprobs"] * mask, algo.kl.estimator, algo.log_ratio_clamp, algo.kl.clamp)
    kl = aggregate(per_token_kl, mask, agg, algo.loss_norm_len)
    kl_coef = float(micro["kl_coef"])
    if kl_coef:  # 0 * an overflowing estimate would still be NaN
        loss = loss + kl_coef * kl
    stats = {
        "policy_loss": per_token(pg, mask, agg),
        "entropy": per_token(entropy, mask, agg),
        "kl_loss": per_token(kl, mask, agg),
        "clipfrac": pg_stats["clipfrac"],
    }
    if "approx_kl" in pg_stats:  # token-level ratios (not GSPO): KL(old || new) as k3 and as k1
        stats |= {"approx_kl": pg_stats["approx_kl"], "ppo_kl": pg_stats["ppo_kl"]}
    if own_old:
        gap = (old_logp - micro["rollout_logprobs"]).abs() * mask
        gap_agg = "token_mean" if agg in ("token_mean", "token_sum") else "seq_mean_token_mean"
        stats["logprob_diff_mean"] = float(aggregate(gap, mask, gap_agg))
        stats["logprob_diff_max"] = float(gap.max()) if gap.numel() else 0.0
    return loss, stats


def value_objective(model: torch.nn.Module, micro: Batch, algo: AlgorithmConfig) -> Result:
    """vf_coef * clipped value loss, aggregated as the policy loss is (algo.loss_agg).
    micro: response_mask, returns, old_values [n, R]."""
    mask = micro["response_mask"]
    values = token_values(model, micro)
    loss, stats = value_loss(values, micro["old_values"], micro["returns"], mask, algo.value_clip, algo.loss_agg)
    return algo.vf_coef * loss, {
        "value_loss": per_token(loss, mask, algo.loss_agg),
        "value_clipfrac": stats["clipfrac"],
        "values_mean": float(masked_mean(values.detach(), mask)),
    }


def sft_targets(micro: Batch) -> torch.Tensor:
    """Mask [n, L-1] of the tokens the SFT loss predicts: loss_mask shifted past the first column."""
    return micro["loss_mask"][:, 1:].float()


def next_token_logprobs(model: torch.nn.Module, micro: Batch) -> torch.Tensor:
    """log p(input_ids[:, t+1] | input_ids[:, :t+1]) for every position: [n, L-1] fp32 nats, 0 off loss_mask."""
    ids, attention_mask = micro["input_ids"], micro["attention_mask"]
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False).logits
    return logprobs_from_logits(logits[:, :-1].float(), ids[:, 1:]) * sft_targets(micro)


def sft_objective(model: torch.nn.Module, micro: Batch) -> Result:
    """Mean negative log-likelihood of the tokens marked by loss_mask [n, L] (nats per token)."""
    loss = sft_loss(next_token_logprobs(model, micro), sft_targets(micro))
    return loss, {"sft_loss": float(loss.detach())}


def rm_objective(model: torch.nn.Module, micro: Batch) -> Result:
    """Bradley-Terry loss of the reward model on (chosen, rejected) pairs, both sides in one forward."""
    sides = [(micro[f"{side}_input_ids"], micro[f"{side}_attention_mask"]) for side in ("chosen", "rejected")]
    width = max(ids.shape[1] for ids, _ in sides)
    ids = torch.cat([F.pad(ids, (0, width - ids.shape[1])) for ids, _ in sides])
    mask = torch.cat([F.pad(mask, (0, width - mask.shape[1])) for _, mask in sides])
    chosen, rejected = sequence_scores(model, ids, mask).chunk(2)
    loss, stats = pairwise_rm_loss(chosen, rejected)
    return loss, {
        "rm_loss": float(loss.detach()),
        "rm_accuracy": stats["accuracy"],
        "rm_margin": stats["margin_mean"],
        "rm_chosen_mean": float(chosen.detach().mean()),
    }
