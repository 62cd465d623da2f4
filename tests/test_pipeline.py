"""The RL driver end to end with real Ray, vLLM and DeepSpeed: reward rises; a resumed run matches."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from rlhf_ray.config import load_config
from rlhf_ray.driver.loop import train
from rlhf_ray.recipes.synthetic import prompt_rows


def _cfg(tiny_model_dir: Path, tmp: Path, steps: int, run_name: str, *extra: str):
    prompts = tmp / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in prompt_rows(64, seed=0)))
    return load_config(None, [
        f"model.policy_path={tiny_model_dir / 'policy'}", "model.max_model_len=64",
        "algorithm.name=grpo", "algorithm.kl.placement=loss", "algorithm.kl.estimator=k3", "algorithm.kl.coef=0.001",
        "reward.use_model=false", "reward.functions=[{path: 'rlhf_ray.rewards:brevity'}]",
        f"data.prompts.path={prompts}", "data.prompts.template=chat",
        "rollout.kv_cache_space_gib=0.25", "rollout.sampling.n=4", "rollout.sampling.max_new_tokens=12",
        "learner.lr=3e-2", "learner.min_lr_ratio=1.0", "learner.micro_batch_size=16", "learner.minibatch_size=16",
        f"train.steps={steps}", "train.prompts_per_step=8", f"train.output_dir={tmp}", f"train.run_name={run_name}",
        "tracking.backend=none", "checkpoint.every=2", "cluster.num_cpus=8", *extra,
    ])


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_grpo_reward_rises_and_resume_matches(tiny_model_dir: Path, tmp_path: Path, ray_cluster: None):
    full = _cfg(tiny_model_dir, tmp_path, steps=6, run_name="full")
    train(full, tmp_path / "full")
    rows = _metrics(tmp_path / "full")
    rewards = [r["reward/mean"] for r in rows]
    assert sum(rewards[-2:]) > sum(rewards[:2]), rewards
    assert all(r["rollout/logprob_diff_mean"] < 1e-3 for r in rows)
    assert [r["rollout/policy_version"] for r in rows] == [0, 1, 2, 3, 4, 5]

    train(_cfg(tiny_model_dir, tmp_path, steps=2, run_name="resumed"), tmp_path / "resumed")
    train(_cfg(tiny_model_dir, tmp_path, steps=3, run_name="resumed"), tmp_path / "resumed", resume=True)
    resumed = _metrics(tmp_path / "resumed")
    assert [r["step"] for r in resumed] == [0, 1, 2]
    for key in ("reward/mean", "train/policy_loss", "kl/mean", "train/grad_norm"):
        assert resumed[2][key] == pytest.approx(rows[2][key], abs=1e-6), key


@pytest.mark.slow
def test_async_mode_generates_one_step_ahead(tiny_model_dir: Path, tmp_path: Path, ray_cluster: None):
    train(_cfg(tiny_model_dir, tmp_path, 3, "async", "train.async_mode=true"), tmp_path / "async")
    rows = _metrics(tmp_path / "async")
    # batch k > 0 was generated during step k-1, before its update: one policy version stale
    assert [r["rollout/policy_version"] for r in rows] == [0, 0, 1]
    assert rows[0]["rollout/logprob_diff_max"] < 1e-3  # the first batch is on-policy
    assert min(r["rollout/logprob_diff_mean"] for r in rows[1:]) > 10 * rows[0]["rollout/logprob_diff_mean"]
    assert all(math.isfinite(r["train/policy_loss"]) and r["train/skipped_steps"] == 0 for r in rows)


@pytest.mark.parametrize("old_logprobs, reference", [("recompute", "actor"), ("auto", "learner")])
def test_sampling_temperature_reaches_learner_and_reference(
    tiny_model_dir: Path, tmp_path: Path, ray_cluster: None, old_logprobs: str, reference: str
):
    """At T = 0.7 the learner (old log-probs, or the update's own forward) and the reference (its own actor, or
    held by the learner ranks) score log_softmax(logits / 0.7), as vLLM sampled: the mismatch stays at fp32
    rounding, and before the first update the policy-to-reference KL is zero."""
    cfg = _cfg(tiny_model_dir, tmp_path, 2, f"t07-{old_logprobs}", "rollout.sampling.temperature=0.7",
               f"algorithm.old_logprobs={old_logprobs}", "checkpoint.every=0", f"reference.placement={reference}")
    train(cfg, tmp_path / "t07")
    rows = _metrics(tmp_path / "t07")
    assert all(r["rollout/logprob_diff_mean"] < 1e-4 for r in rows), [r["rollout/logprob_diff_mean"] for r in rows]
    assert abs(rows[0]["kl/mean"]) < 1e-3, rows[0]["kl/mean"]
