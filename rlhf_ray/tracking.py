"""Run tracking: Weights & Biases (offline by default), a local metrics.jsonl, console lines, secret masking.

Every metric a run logs is named and documented, with its unit, in `METRICS`
below (the README renders it with `metrics_markdown()`). `metrics.jsonl` in
the run folder gets one JSON line per step whatever the backend, so a run can
be read without W&B. Secrets never reach a run's files: the config is
redacted before W&B sees it, W&B does not capture the console, and
`SecretFilter` masks environment secrets in every log record.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import wandb

from rlhf_ray.config import TrackingConfig
from rlhf_ray.redaction import environment_secrets, mask, redact, secret_values_in


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
    # reward: scores of the step's samples, before the KL penalty
    "reward/mean": "Mean combined reward per sequence (reward units).",
    "reward/std": "Standard deviation of the combined reward per sequence (reward units).",
    "reward/model_mean": "Mean reward-model score (reward-model units).",
    "reward/<function>_mean": "Mean score of each rule-based reward function, named by the function (its units).",
    "reward/masked_rows": "Samples whose reward failed after retries and were masked out (count).",
    # train: the learner update (means over the step's minibatches)
    "train/policy_loss": "Clipped policy-gradient loss (nats-weighted advantage).",
    "train/value_loss": "Critic value loss, PPO only (squared reward units).",
    "train/clipfrac": "Fraction of tokens whose probability ratio was clipped (0-1).",
    "train/approx_kl": "Approximate KL between the policy before and after the update (nats/token).",
    "train/entropy": "Policy entropy on the response tokens (nats/token).",
    "train/grad_norm": "Policy gradient norm before clipping (L2).",
    "train/lr": "Policy learning rate at the step's last optimizer step (1).",
    "train/skipped_steps": "Optimizer steps skipped for non-finite experience, loss or gradient norm (count).",
    "train/consecutive_skips": "RL steps in a row whose whole update was skipped; the run stops at "
    "learner.max_consecutive_skips (count).",
    "train/advantage_mean": "Mean advantage over response tokens, before whitening (reward units).",
    "train/value_mean": "Mean critic value over response tokens, PPO only (reward units).",
    # pretrain, sft, rm: the supervised stages, one line per optimizer step
    "pretrain/sft_loss": "Pretraining: next-token loss of the batch (nats/token).",
    "sft/sft_loss": "SFT: loss on the batch's response tokens and their EOS (nats/token).",
    "sft/grad_norm": "SFT gradient norm before clipping; also pretrain/grad_norm and rm/grad_norm (L2).",
    "sft/lr": "SFT learning rate; also pretrain/lr and rm/lr (1).",
    "sft/skipped_steps": "SFT optimizer steps skipped for a non-finite loss or gradient; also under pretrain/ and "
    "rm/ (count).",
    "rm/rm_loss": "Reward model: Bradley-Terry loss of the batch (nats/pair).",
    "rm/rm_accuracy": "Reward model: fraction of the batch's pairs scored chosen > rejected (0-1).",
    "rm/rm_margin": "Reward model: mean chosen minus rejected score (reward-model units).",
    "rm/rm_chosen_mean": "Reward model: mean score of the chosen responses (reward-model units).",
    # kl: distance from the reference (SFT) policy
    "kl/mean": "KL to the reference policy summed over a response, mean over samples (nats/sequence).",
    "kl/per_token": "KL to the reference policy per response token (nats/token).",
    "kl/coef": "KL penalty coefficient used this step (1/nats).",
    # eval: held-out prompts or pairs, every train.eval_every steps
    "eval/reward_mean": "Mean reward on the evaluation prompts (reward units).",
    "eval/response_len_mean": "Mean response length on the evaluation prompts (tokens).",
    "eval/sft_loss": "`rlhf-ray sft`: loss on the sft.eval_fraction held-out rows, after training (nats/token).",
    "eval/rm_accuracy": "Reward model: fraction of held-out pairs scored chosen > rejected, after training (0-1).",
    "eval/rm_accuracy_<kind>": "Demo reward model: eval/rm_accuracy on each kind of held-out pair (0-1).",
    # perf: throughput
    "perf/sync_gb_per_s": "Weight broadcast bandwidth, learner rank 0 to all rollout workers (GB/s).",
    "perf/samples_per_s": "Samples (prompt-response pairs) per second of the whole step (samples/s).",
    # timing: wall-clock seconds per stage of a step
    "timing/generate_s": "Generating the rollout batch (s).",
    "timing/reward_s": "Scoring the samples (s).",
    "timing/reference_s": "Reference-policy log-probs (s).",
    "timing/logprobs_s": "Learner log-probs and critic values of the samples (s).",
    "timing/update_s": "PPO epochs on the learner group (s).",
    "timing/sync_s": "Broadcasting the new weights to the rollout actors (s).",
    "timing/sync_reload_s": "Of timing/sync_s, the slowest rollout actor's time inside vLLM's weight reload (s).",
    "timing/step_s": "The whole step (s).",
}

NAMESPACES = ("rollout", "reward", "train", "kl", "eval", "perf", "timing", "pretrain", "sft", "rm")

# Shown on the console, in this order, when present: (metric, label, format).
CONSOLE_FIELDS: tuple[tuple[str, str, str], ...] = (
    ("reward/mean", "reward", ".4g"),
    ("kl/mean", "kl", ".4g"),
    ("train/policy_loss", "pg_loss", ".4g"),
    ("train/value_loss", "vf_loss", ".4g"),
    ("train/clipfrac", "clip", ".3f"),
    ("train/lr", "lr", ".2e"),
    ("rollout/response_len_mean", "len", ".1f"),
    ("rollout/tokens_per_s", "tok/s", ".0f"),
    ("timing/step_s", "step_s", ".2f"),
)


def metrics_markdown() -> str:
    """`METRICS` as a Markdown table (for the README)."""
    rows = [f"| `{name}` | {text} |" for name, text in METRICS.items()]
    return "\n".join(["| metric | meaning (unit) |", "|---|---|", *rows])


def console_line(step: int, total_steps: int, metrics: Mapping[str, float]) -> str:
    """One line per step, e.g. `step 3/10 | reward 0.41 | kl 0.02 | ...`; step is 0-based, shown 1-based."""
    parts = [f"step {step + 1}/{total_steps}"]
    parts += [f"{label} {float(metrics[key]):{fmt}}" for key, label, fmt in CONSOLE_FIELDS if key in metrics]
    return " | ".join(parts)


class SecretFilter(logging.Filter):
    """Masks secret values (environment secrets plus `extra`) in a log record's message and traceback."""

    def __init__(self, extra: Iterable[str] = ()) -> None:
        super().__init__()
        self.extra = {s for s in extra if len(s) >= 6}

    def mask(self, text: str) -> str:
        return mask(text, environment_secrets() | self.extra)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed call; the handler reports it, the filter must not raise into user code
            return True
        record.msg, record.args = self.mask(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.mask(record.exc_text)
        if record.stack_info:
            record.stack_info = self.mask(record.stack_info)
        return True


def install_secret_filter(extra: Iterable[str] = ()) -> SecretFilter:
    """Put one `SecretFilter` on the root logger, its handlers and the last-resort handler.

    A logger's filters see only records logged on that logger, not those propagated from
    `logging.getLogger(__name__)` children, so the handlers need the filter too.
    """
    root = logging.getLogger()
    found = [f for f in root.filters if isinstance(f, SecretFilter)]
    secret_filter = found[0] if found else SecretFilter()
    secret_filter.extra |= {s for s in extra if len(s) >= 6}
    for target in [root, *root.handlers, logging.lastResort]:
        if target is not None and secret_filter not in target.filters:
            target.addFilter(secret_filter)
    return secret_filter


WANDB_ID_FILE = "wandb_run_id"


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line).get("step", -1))
    except (ValueError, AttributeError, TypeError):
        return -1  # a line cut by a kill mid-write


class Tracker:
    """Logs a run's metrics to `run_dir/metrics.jsonl` and, with backend wandb, to a W&B run in `run_dir`."""

    console_line = staticmethod(console_line)

    def __init__(
        self, cfg: TrackingConfig, run_dir: str | os.PathLike, run_name: str, config_dict: dict[str, Any]
    ) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.secret_filter = install_secret_filter(secret_values_in(config_dict))
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a")  # append: a resumed run continues the file
        self.run = None
        if cfg.backend == "wandb":
            secrets = environment_secrets() | self.secret_filter.extra
            self.run = wandb.init(
                id=self.wandb_run_id(), resume="allow",  # a resumed run continues its W&B run
                project=redact(cfg.project, secrets),
                entity=redact(cfg.entity, secrets) or None,
                name=redact(run_name, secrets),
                dir=str(self.run_dir),
                mode=cfg.mode,
                config=redact(config_dict, secrets),
                # Console capture would copy anything printed (secrets included) into the run's files, and
                # the metadata holds the raw command line (an override may carry a secret).
                settings=wandb.Settings(console="off", silent=True, x_disable_meta=True, disable_git=True),
            )

    def wandb_run_id(self) -> str:
        """The W&B run id kept in `run_dir/wandb_run_id` (created on first use), so a resume continues that run."""
        path = self.run_dir / WANDB_ID_FILE
        if path.is_file():
            return path.read_text().strip()
        run_id = secrets.token_hex(4)
        path.write_text(run_id + "\n")
        return run_id

    def rewind(self, step: int) -> int:
        """Drop metrics.jsonl lines of steps >= `step` (logged after the checkpoint a run resumes from), so
        each step appears once; the file is replaced atomically. Returns the number of lines dropped."""
        path = self.run_dir / "metrics.jsonl"
        self._jsonl.close()
        lines = path.read_text().splitlines(keepends=True) if path.is_file() else []
        kept = [line for line in lines if 0 <= _step_of(line) < step]  # a half-written line goes too
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)
        self._jsonl = open(path, "a")
        return len(lines) - len(kept)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        """Record one step's metrics (names from `METRICS`) as a metrics.jsonl line and in W&B."""
        values = {k: float(v) for k, v in metrics.items()}
        self._jsonl.write(json.dumps({"step": step, "time": time.time(), **values}) + "\n")
        self._jsonl.flush()
        if self.run is not None:
            self.run.log(values, step=step)

    def log_table(self, name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int) -> None:
        """Log a table (e.g. sample generations) to W&B; without W&B it is not recorded."""
        if self.run is None:
            return
        secrets = environment_secrets() | self.secret_filter.extra
        self.run.log({name: wandb.Table(columns=list(columns), data=redact(list(rows), secrets))}, step=step)

    def log_samples(
        self, step: int, prompts: Sequence[str], responses: Sequence[str], rewards: Sequence[float]
    ) -> None:
        """The first `cfg.log_samples` generations of a step as the W&B table `samples`."""
        k = self.cfg.log_samples
        if k:
            rows = [[p, r, float(s)] for p, r, s in zip(prompts[:k], responses[:k], rewards[:k])]
            self.log_table("samples", ["prompt", "response", "reward"], rows, step)

    def finish(self) -> None:
        """Close metrics.jsonl and end the W&B run (flushing it to `run_dir/wandb`)."""
        if not self._jsonl.closed:
            self._jsonl.close()
        if self.run is not None:
            self.run.finish()
            # finish() returns before wandb-core has closed the run file; teardown waits for it, so the
            # run folder is complete (ready for `wandb sync`) when this returns.
            wandb.teardown()
            self.run = None

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, *exc: object) -> None:
        self.finish()

