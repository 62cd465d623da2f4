"""The RL driver: one single-controller loop, rollout → reward → reference → advantages → update → broadcast.

Read `train()` top to bottom; `setup()` builds the actors it calls.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from rlhf_ray.algorithms import AdaptiveKLController, FixedKLController, masked_mean
from rlhf_ray.config import RunConfig
from rlhf_ray.driver.recovery import apply_scaling, broadcast_replacing_dead, failure_metrics, log_failures
from rlhf_ray.experience import make_experience
from rlhf_ray.protocol import RolloutResult, collate
from rlhf_ray.driver.components import RunComponents, build_components, restore_checkpoint, save_checkpoint
from rlhf_ray.driver.step_guard import StepGuard, guard_rewards

log = logging.getLogger(__name__)


class StageTimer:
    """Wall-clock seconds per named stage of one step (`timing/<stage>_s`)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start

    def metrics(self) -> dict[str, float]:
        return {f"timing/{k}_s": v for k, v in self.seconds.items()}


def kl_controller(cfg: RunConfig) -> FixedKLController | AdaptiveKLController:
    kl = cfg.algorithm.kl
    return AdaptiveKLController(kl.coef, kl.target, kl.horizon) if kl.adaptive else FixedKLController(kl.coef)


def rollout_metrics(rollout: RolloutResult, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """Generation figures of the step's samples."""
    mask = batch["response_mask"]
    return {
        "rollout/tokens_per_s": rollout.num_tokens / max(rollout.seconds, 1e-9),
        "rollout/response_len_mean": float(mask.sum(-1).mean()),
        "rollout/truncated_frac": sum(s.finish_reason == "length" for s in rollout.samples) / len(rollout.samples),
        "rollout/policy_version": float(min(s.policy_version for s in rollout.samples)),
    }


def logprob_gap(
    batch: dict[str, torch.Tensor], learner_logp: torch.Tensor | None, update_metrics: dict[str, float]
) -> dict[str, float]:
    """|vLLM - learner| log-prob of the sampled tokens: mean (nats per token) and max (nats).

    From the learner's old log-probs [N, R]; when those were skipped (None), the update measured the
    gap on its own forward and reported it as train/logprob_diff_*, moved here (NaN if it was skipped).
    """
    if learner_logp is None:
        return {f"rollout/logprob_diff_{k}": update_metrics.pop(f"train/logprob_diff_{k}", float("nan"))
                for k in ("mean", "max")}  # fmt: skip
    mask = batch["response_mask"]
    gap = (batch["rollout_logprobs"] - learner_logp).abs() * mask
    return {"rollout/logprob_diff_mean": float(masked_mean(gap, mask)), "rollout/logprob_diff_max": float(gap.max())}


def train(cfg: RunConfig, run_dir: Path, resume: bool = False) -> dict[str, Any]:
    """Run `cfg.train.steps` RL steps; returns the last step's metrics."""
    c: RunComponents = build_components(cfg, run_dir)
    kl_ctl = kl_controller(cfg)
    guard = StepGuard.for_run(cfg, c.checkpoints.root)
    start = restore_checkpoint(c, kl_ctl, guard) if resume else 0
    n = cfg.rollout.sampling.n
    algo = cfg.algorithm
    pending = None  # async mode: (rows, handle) of the batch being generated during an update
    if cfg.train.async_mode:
        rows, ids = c.prompts.next_batch()
        pending = (rows, c.pool.submit(ids))
    metrics: dict[str, Any] = {}
    try:
        for step in range(start, cfg.train.steps):
            timer, step_start = StageTimer(), time.perf_counter()
            pool_metrics = apply_scaling(c, step)  # the size asked for by `rlhf-ray scale`, between steps

            # 1. rollout: n samples for each of B prompts (in async mode, generated during the previous step)
            with timer("generate"):
                if pending is None:
                    rows, ids = c.prompts.next_batch()
                    rollout = c.pool.generate(ids)
                else:
                    rows, rollout = pending[0], c.pool.collect(pending[1])
                    pending = None
            if cfg.train.async_mode and step + 1 < cfg.train.steps:
                next_rows, next_ids = c.prompts.next_batch()  # generated with this version during stages 2-3
                pending = (next_rows, c.pool.submit(next_ids))
            batch = collate(rollout.samples, c.tokenizer.pad_token_id)
            responses = c.tokenizer.batch_decode([s.response_ids for s in rollout.samples], skip_special_tokens=True)
            prompts = [rows[s.prompt_id]["prompt"] for s in rollout.samples]
            sample_rows = [rows[s.prompt_id] for s in rollout.samples]

            # 2. rewards, reference and learner log-probs, values
            reference_call = c.reference.start("compute_logprobs", batch)  # runs in its actor while rewards score
            with timer("reward"):
                rewards = c.reward.score([s.prompt_ids + s.response_ids for s in rollout.samples], prompts, responses, sample_rows)
                rewards = guard_rewards(rewards, len(rollout.samples))  # NaN/inf/huge scores are masked
            with timer("reference"):  # what is left of the reference forward after scoring
                ref_logp = reference_call()
            with timer("logprobs"):  # one on-policy optimizer step needs no old log-probs (cfg.skips_old_logprobs)
                old_logp = None if cfg.skips_old_logprobs else c.policy.compute_logprobs(batch)
                values = c.critic.compute_values(batch) if algo.uses_critic else None

            # 3. advantages and KL, then the update
            scores = c.reward_normalizer(rewards["scores"], rewards["valid"])
            policy_logp = batch["rollout_logprobs"] if old_logp is None else old_logp  # the KL to the reference
            exp, step_metrics = make_experience(
                batch, scores, policy_logp, ref_logp, values, algo, kl_ctl.value, n, valid=rewards["valid"]
            )
            if old_logp is None:
                del exp["old_logprobs"]  # the update uses its own, detached
            if algo.tis_cap is not None or old_logp is None:
                exp["rollout_logprobs"] = batch["rollout_logprobs"]
            with timer("update"):  # skipped on NaN/inf experience; stops the run after too many skips in a row
                step_metrics |= guard.update(step, exp, c.policy, c.critic)
            if guard.applied:
                kl_ctl.update(step_metrics["kl/mean"], len(rollout.samples))

            # 4. fresh weights to every rollout actor, checked by checksum
            with timer("sync"):  # an actor that dies here is replaced, like one that dies generating
                sync, sync_failures = broadcast_replacing_dead(c, step)
            rollout.failures += sync_failures

            # 5. logging and checkpoints
            step_metrics |= rollout_metrics(rollout, batch) | logprob_gap(batch, old_logp, step_metrics)
            step_metrics |= failure_metrics(rollout) | pool_metrics
            step_metrics |= {
                "reward/mean": float(rewards["scores"].mean()),
                "reward/std": float(rewards["scores"].std()),
                "reward/masked_rows": float((~rewards["valid"]).sum()),
                "perf/sync_gb_per_s": sync.gb_per_s,
                "timing/sync_reload_s": sync.reload_seconds,
                "perf/samples_per_s": len(rollout.samples) / (time.perf_counter() - step_start),
            }
            step_metrics |= {f"reward/{k}_mean": float(v.float().mean()) for k, v in rewards.items() if k not in ("scores", "valid")}
            step_metrics |= timer.metrics()
            step_metrics["timing/step_s"] = time.perf_counter() - step_start
            if step_metrics["rollout/logprob_diff_mean"] > algo.logprob_mismatch_warn:
                log.warning(
                    "step %d: vLLM and learner log-probs differ by %.4f nats/token on average (bound %.4f)",
                    step, step_metrics["rollout/logprob_diff_mean"], algo.logprob_mismatch_warn,
                )
            c.tracker.log(step_metrics, step=step)
            c.tracker.log_samples(step, prompts, responses, rewards["scores"].tolist())
            log_failures(c.tracker, step, rollout)
            print(c.tracker.console_line(step, cfg.train.steps, step_metrics), flush=True)
            if cfg.checkpoint.every and (step + 1) % cfg.checkpoint.every == 0 or step + 1 == cfg.train.steps:
                save_checkpoint(c, step + 1, kl_ctl, guard, pending_batches=int(pending is not None))
            metrics = step_metrics
    finally:
        c.close()
    return metrics
