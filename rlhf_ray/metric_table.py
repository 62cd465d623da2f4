"""The metric table: every metric a run logs, named and documented with its unit.

`metrics.jsonl` lines and W&B runs use exactly these names; the README's table is rendered from
`METRICS` with `metrics_markdown()`, and tests/test_metric_table.py checks both directions against
what real runs log.
"""

from __future__ import annotations

from typing import Iterable


METRICS: dict[str, str] = {
    # rollout: what the vLLM actors generated
    "rollout/tokens_per_s": "Response tokens generated per second of generation, all actors together (tokens/s).",
    "rollout/response_len_mean": "Mean response length (tokens).",
    "rollout/truncated_frac": "Fraction of responses stopped by max_new_tokens instead of EOS (0-1).",
    "rollout/policy_version": "Oldest policy version among the step's samples (updates since start).",
    "rollout/logprob_diff_mean": "Mean |vLLM - learner| log-prob of the sampled tokens (nats/token).",
    "rollout/logprob_diff_max": "Largest |vLLM - learner| log-prob gap on any sampled token (nats).",
    "rollout/tokens_per_s/<actor>": "Response tokens per second of each rollout actor's own generation time (tokens/s).",
    "rollout/num_actors": "Rollout actors the step ran with; changes with `rlhf-ray scale` (count).",
    "rollout/actor_failures": "Rollout actors that died during the step's generation; W&B table rollout/failures "
    "names each with its node (count).",
    "rollout/actor_restarts": "Dead rollout actors replaced during the step (count).",
    "rollout/recovery_s": "Longest time from noticing a rollout actor's death to its samples regenerated and its "
    "replacement serving (s).",
    "rollout/probe_logprob_diff_mean": "After the broadcast, worst actor's mean |vLLM - learner| log-prob on the fixed probe batch; NaN on steps not probed (`weight_sync.probe_every`) (nats/token).",
    "rollout/probe_logprob_diff_max": "Largest single gap on that probe batch (nats).",
    "rollout/dynamic_sampling_rounds": "Extra generation rounds this step to fill the batch with groups whose rewards differ (count).",
    "rollout/dynamic_sampling_dropped_groups": "Prompt groups seen this step whose rewards were all equal (or with < 2 valid), left out (count).",
    "rollout/dynamic_sampling_padded_groups": "Dropped groups put back, marked invalid (no gradient), when the rounds ran out (count).",
    "rollout/overlong_filtered": "Truncated responses given no gradient (`algorithm.overlong_filter`) (count).",
    # reward: scores of the step's samples, before the KL penalty
    "reward/mean": "Mean combined reward per sequence (reward units).",
    "reward/unfiltered_mean": "With dynamic sampling: mean reward of the step's first B prompts before groups are dropped, comparable to other algorithms' reward/mean (the kept batch's is biased to mixed groups) (reward units).",
    "reward/overlong_penalty_mean": "Mean DAPO soft overlong penalty added to the reward (`algorithm.overlong_buffer`) (reward units).",
    "reward/std": "Standard deviation of the combined reward per sequence (reward units).",
    "reward/flat_steps": "RL steps in a row (up to this one) where no prompt's samples got different rewards (count).",
    "reward/model_mean": "Mean reward-model score (reward-model units).",
    "reward/<function>_mean": "Mean score of each rule-based reward function, named by the function (its units).",
    "reward/masked_rows": "Samples whose reward failed after retries and were masked out (count).",
    # train: the learner update (means over the step's minibatches)
    "train/policy_loss": "Clipped policy-gradient loss (nats-weighted advantage).",
    "train/value_loss": "Critic value loss, PPO only (squared reward units).",
    "train/clipfrac": "Fraction of tokens whose probability ratio was clipped (0-1).",
    "train/approx_kl": "KL(old ‖ new) between the policy before and after the update, k3 estimator mean(r - 1 - log r) over response tokens; not logged by GSPO (nats/token).",
    "train/ppo_kl": "The same KL as the k1 estimator mean(log π_old - log π_new), what OpenRLHF and veRL log as ppo_kl (nats/token).",
    "train/entropy": "Policy entropy on the response tokens (nats/token).",
    "train/grad_norm": "Policy gradient norm before clipping (L2).",
    "train/lr": "Policy learning rate at the step's last optimizer step (1).",
    "train/skipped_steps": "Optimizer steps skipped for non-finite experience, loss or gradient norm (count).",
    "train/consecutive_skips": "RL steps in a row whose whole update was skipped; the run stops at "
    "learner.max_consecutive_skips (count).",
    "train/advantage_mean": "Mean advantage over response tokens, before whitening (reward units).",
    "train/value_mean": "Mean critic value over response tokens, PPO only (reward units).",
    "train/kl_loss": "KL(policy || reference) term of the policy loss, before its coefficient (nats/token).",
    "train/value_clipfrac": "Critic: fraction of tokens whose value was clipped to old value ± value_clip, PPO only (0-1).",
    "train/values_mean": "Critic: mean value over response tokens during its update, PPO only (reward units).",
    "train/critic_grad_norm": "Critic gradient norm before clipping, PPO only (L2).",
    "train/critic_lr": "Critic learning rate at the step's last optimizer step, PPO only (1).",
    "train/critic_skipped_steps": "Critic optimizer steps skipped for a non-finite loss or gradient, PPO only (count).",
    # pretrain, sft, rm: the supervised stages, one line per optimizer step
    "pretrain/sft_loss": "Pretraining: next-token loss of the batch (nats/token).",
    "sft/sft_loss": "SFT: loss on the batch's response tokens and their EOS (nats/token).",
    "pretrain/grad_norm": "Pretraining gradient norm before clipping (L2).",
    "pretrain/lr": "Pretraining learning rate (1).",
    "pretrain/skipped_steps": "Pretraining optimizer steps skipped for a non-finite loss or gradient (count).",
    "sft/grad_norm": "SFT gradient norm before clipping (L2).",
    "sft/lr": "SFT learning rate (1).",
    "sft/skipped_steps": "SFT optimizer steps skipped for a non-finite loss or gradient (count).",
    "rm/rm_loss": "Reward model: Bradley-Terry loss of the batch (nats/pair).",
    "rm/rm_accuracy": "Reward model: fraction of the batch's pairs scored chosen > rejected (0-1).",
    "rm/rm_margin": "Reward model: mean chosen minus rejected score (reward-model units).",
    "rm/rm_chosen_mean": "Reward model: mean score of the chosen responses (reward-model units).",
    "rm/grad_norm": "Reward-model gradient norm before clipping (L2).",
    "rm/lr": "Reward-model learning rate (1).",
    "rm/skipped_steps": "Reward-model optimizer steps skipped for a non-finite loss or gradient (count).",
    # kl: distance from the reference (SFT) policy
    "kl/mean": "KL to the reference policy summed over a response, mean over samples (nats/sequence).",
    "kl/per_token": "KL to the reference policy per response token (nats/token).",
    "kl/coef": "KL penalty coefficient used this step (1/nats).",
    # eval: held-out prompts (`rlhf-ray eval`, per template) or pairs, after training
    "eval/reward_mean": "`rlhf-ray eval`: mean combined reward on the data.eval prompts (reward units).",
    "eval/response_len_mean": "`rlhf-ray eval`: mean response length on the data.eval prompts (tokens).",
    "eval/<source>_mean": "`rlhf-ray eval`: mean score of the reward model (`model`) and of each rule function (its units).",
    "eval/masked_rows": "`rlhf-ray eval`: responses whose reward failed after retries (count).",
    "eval/num_prompts": "`rlhf-ray eval`: prompts scored under the template (count).",
    "eval/sft_loss": "`rlhf-ray sft`: loss on the sft.eval_fraction held-out rows, after training (nats/token).",
    "eval/rm_accuracy": "Reward model: fraction of held-out pairs scored chosen > rejected, after training (0-1).",
    "eval/rm_accuracy_<kind>": "Demo reward model: eval/rm_accuracy on each kind of held-out pair (0-1).",
    # perf: throughput
    "perf/sync_gb_per_s": "Weight broadcast bandwidth, learner rank 0 to all rollout workers (GB/s).",
    "perf/samples_per_s": "Samples (prompt-response pairs) per second of the whole step (samples/s).",
    # timing: wall-clock seconds per stage of a step
    "timing/generate_s": "Generating the rollout batch (s).",
    "timing/reward_s": "Scoring the samples (s).",
    "timing/dynamic_sampling_s": "DAPO dynamic sampling: the extra rounds of generation and scoring (s).",
    "timing/reference_s": "Reference-policy log-probs (s).",
    "timing/logprobs_s": "Learner log-probs and critic values of the samples (s).",
    "timing/update_s": "PPO epochs on the learner group (s).",
    "timing/sync_s": "Broadcasting the new weights to the rollout actors (s).",
    "timing/sync_reload_s": "Of timing/sync_s, the slowest rollout actor's time inside vLLM's weight reload (s).",
    "timing/step_s": "The whole step (s).",
}

NAMESPACES = ("rollout", "reward", "train", "kl", "eval", "perf", "timing", "pretrain", "sft", "rm")

def _documented_as(name: str) -> str | None:
    """The METRICS entry naming `name`: itself, or a pattern whose `<placeholder>` stands for the varying part."""
    if name in METRICS:
        return name
    for pattern in METRICS:
        if "<" in pattern:
            head, tail = pattern.split("<")[0], pattern.split(">")[-1]
            if name.startswith(head) and name.endswith(tail) and len(name) > len(head) + len(tail):
                return pattern
    return None


RECORD_FIELDS = ("step", "time")  # what every metrics.jsonl line carries besides the metrics


def undocumented(names: Iterable[str]) -> list[str]:
    """The logged metric names (not the RECORD_FIELDS) with no entry in METRICS, sorted."""
    return sorted(n for n in set(names) if n not in RECORD_FIELDS and _documented_as(n) is None)


def documented_entries(names: Iterable[str]) -> set[str]:
    """The METRICS entries (names or patterns) that the given logged names account for."""
    return {entry for n in names if (entry := _documented_as(n)) is not None}


def metrics_markdown() -> str:
    """`METRICS` as a Markdown table (for the README)."""
    rows = [f"| `{name}` | {text} |" for name, text in METRICS.items()]
    return "\n".join(["| metric | meaning (unit) |", "|---|---|", *rows])
