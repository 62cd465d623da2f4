"""The RL driver: one single-controller loop, rollout → reward → reference → advantages → update → broadcast.

Read `train()` top to bottom; `setup()` builds the actors it calls.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from rlhf_ray.algorithms import AdaptiveKLController, FixedKLController, masked_mean
from rlhf_ray.checkpoint import latest_complete
from rlhf_ray.config import RunConfig
from rlhf_ray.driver.recovery import apply_scaling, broadcast_replacing_dead, failure_metrics, log_failures
from rlhf_ray.experience import make_experience
from rlhf_ray.protocol import Experience, RolloutBatch, RolloutResult, collate
from rlhf_ray.tracking import FlatRewardWatch, flat_reward
from rlhf_ray.driver.components import RunComponents, build_components, restore_checkpoint, save_checkpoint
from rlhf_ray.driver.dynamic_sampling import fill_with_informative_groups, score_rollout
from rlhf_ray.driver.step_guard import StepGuard
from rlhf_ray.tracking import StageTimer
from rlhf_ray.progress import LiveLine, stage_status

log = logging.getLogger(__name__)


def kl_controller(cfg: RunConfig) -> FixedKLController | AdaptiveKLController:
    kl = cfg.algorithm.kl
    return AdaptiveKLController(kl.coef, kl.target, kl.horizon) if kl.adaptive else FixedKLController(kl.coef)


def rollout_metrics(rollout: RolloutResult, batch: RolloutBatch) -> dict[str, float]:
    """Generation figures of the step's samples."""
    mask = batch["response_mask"]
    return {
        "rollout/tokens_per_s": rollout.num_tokens / max(rollout.seconds, 1e-9),
        "rollout/response_len_mean": float(mask.sum(-1).mean()),
        "rollout/truncated_frac": sum(s.finish_reason == "length" for s in rollout.samples) / len(rollout.samples),
        "rollout/policy_version": float(min(s.policy_version for s in rollout.samples)),
    }


def logprob_gap(
    batch: RolloutBatch, learner_logp: torch.Tensor | None, update_metrics: dict[str, float]
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


def update_learners(c: RunComponents, exp: Experience, temperature: float) -> dict[str, float]:
    """The policy update (and the critic's, its metrics other than value ones as train/critic_*) on `exp`;
    `temperature` is the one the rollout sampled at (`RunConfig.logprob_temperature`)."""
    metrics = c.policy.ppo_update(exp, temperature)
    if c.critic is not None:
        critic = c.critic.value_update(exp)
        metrics |= {k if "value" in k else k.replace("train/", "train/critic_"): v for k, v in critic.items()}
    return metrics


def _generate(c: RunComponents) -> tuple[list[dict[str, Any]], RolloutResult]:
    rows, ids = c.prompts.next_batch()
    return rows, c.pool.generate(ids)


def train(cfg: RunConfig, run_dir: Path, resume: bool = False) -> dict[str, Any]:
    """Run `cfg.train.steps` RL steps; returns the last step's metrics."""
    c: RunComponents = build_components(cfg, run_dir)
    kl_ctl = kl_controller(cfg)
    guard = StepGuard.for_run(cfg, c.checkpoints.root)
    start = restore_checkpoint(c, kl_ctl, guard) if resume else 0
    n = cfg.rollout.sampling.n
    algo = cfg.algorithm
    temperature = cfg.logprob_temperature  # of every log-prob below: the one vLLM sampled at
    pending = None  # async mode: (rows, handle) of the batch being generated during an update
    if cfg.train.async_mode:
        rows, ids = c.prompts.next_batch()
        pending = (rows, c.pool.submit(ids))
    metrics: dict[str, Any] = {}
    flat_watch = FlatRewardWatch(cfg.train.flat_reward_warn_steps, cfg.train.flat_reward_stop_steps)
    run_start = time.perf_counter()
    live = LiveLine()  # on a terminal: a bar of the step in progress, rewritten as each stage starts
    try:
        for step in range(start, cfg.train.steps):
            timer = StageTimer(on_start=stage_status(live, step, cfg.train.steps, run_start))
            step_start = time.perf_counter()
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

            # 2. rewards (NaN/inf/huge scores masked) while the reference scores the batch in its own actor
            batch = collate(rollout.samples, c.tokenizer.pad_token_id)
            reference_call = None if algo.dynamic_sampling else c.reference.start("compute_logprobs", batch, temperature)
            with timer("reward"):
                scored = score_rollout(c, rows, rollout)
            sampling_metrics: dict[str, float] = {}
            if algo.dynamic_sampling:  # DAPO: only groups whose rewards differ, more prompts until B of them
                with timer("dynamic_sampling"):
                    scored, sampling_metrics = fill_with_informative_groups(
                        scored, lambda: score_rollout(c, *_generate(c)), cfg.train.prompts_per_step, n,
                        algo.dynamic_sampling_max_rounds,
                    )
                batch = collate(scored.rollout.samples, c.tokenizer.pad_token_id)
                reference_call = c.reference.start("compute_logprobs", batch, temperature)  # the groups kept
            rows, rollout, prompts, responses, rewards = (
                scored.rows, scored.rollout, scored.prompts, scored.responses, scored.rewards
            )
            with timer("reference"):  # what is left of the reference forward after scoring
                ref_logp = reference_call()
            with timer("logprobs"):  # one on-policy optimizer step needs no old log-probs (cfg.skips_old_logprobs)
                old_logp = None if cfg.skips_old_logprobs else c.policy.compute_logprobs(batch, temperature)
                values = c.critic.compute_values(batch) if algo.uses_critic else None

            # 3. advantages and KL, then the update
            scores = c.reward_normalizer(rewards["scores"], rewards["valid"])
            exp, step_metrics = make_experience(
                batch, scores, old_logp, ref_logp, values, algo, kl_ctl.value, n, valid=rewards["valid"],
                truncated=torch.tensor([s.finish_reason == "length" for s in rollout.samples]),
                max_new_tokens=cfg.rollout.sampling.max_new_tokens,
            )
            with timer("update"):  # vetoed on NaN/inf experience; the run stops after too many skips in a row
                veto = guard.check_experience(exp)
                step_metrics |= guard.record_update(step, veto, {} if veto else update_learners(c, exp, temperature))
            if guard.applied:
                kl_ctl.update(step_metrics["kl/mean"], len(rollout.samples))

            # 4. fresh weights to every rollout actor, checked by checksum
            with timer("sync"):  # an actor that dies here is replaced, like one that dies generating
                sync, sync_failures = broadcast_replacing_dead(c, step)
            rollout.failures += sync_failures

            # 5. logging and checkpoints
            step_metrics |= rollout_metrics(rollout, batch) | logprob_gap(batch, old_logp, step_metrics)
            step_metrics |= failure_metrics(rollout) | pool_metrics | sampling_metrics
            step_metrics |= {
                "reward/mean": float(rewards["scores"].mean()),
                "reward/std": float(rewards["scores"].std()),
                "reward/masked_rows": float((~rewards["valid"]).sum()),
                "perf/sync_gb_per_s": sync.gb_per_s,
                "timing/sync_reload_s": sync.reload_seconds,
                "rollout/probe_logprob_diff_mean": sync.probe_diff_mean,
                "rollout/probe_logprob_diff_max": sync.probe_diff_max,
                "perf/samples_per_s": len(rollout.samples) / (time.perf_counter() - step_start),
            }
            step_metrics |= {f"reward/{k}_mean": float(v.float().mean()) for k, v in rewards.items() if k not in ("scores", "valid")}
            stop = flat_watch.update(step, flat_reward(rewards["scores"].tolist(), rewards["valid"].tolist(), n))
            step_metrics["reward/flat_steps"] = float(flat_watch.run)
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
            eta = (time.perf_counter() - run_start) / (step + 1 - start) * (cfg.train.steps - step - 1)
            live.line(c.tracker.console_line(step, cfg.train.steps, step_metrics, eta))
            last = step + 1 == cfg.train.steps or stop
            if cfg.checkpoint.every and (step + 1) % cfg.checkpoint.every == 0 or last:
                save_checkpoint(c, step + 1, kl_ctl, guard, pending_batches=int(pending is not None))
            metrics = step_metrics
            if stop:
                log.warning("stopping at step %d: train.flat_reward_stop_steps=%d steps in a row had flat rewards",
                            step + 1, cfg.train.flat_reward_stop_steps)
                break
    finally:
        live.close()
        c.close()
    final = latest_complete(c.checkpoints.root, verify="size")
    if final is not None:
        print(f"model: {final / 'policy'} (optimizer and run state beside it in {final})", flush=True)
    return metrics
